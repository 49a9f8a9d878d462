"""ControlNet training against diffusers: a new ControlNet equals `ControlNetModel.from_unet`,
and the loss and every ControlNet gradient of a step with the UNet frozen equal diffusers'
train_controlnet.py step (ControlNetModel + UNet2DConditionModel + DDPMScheduler), fp32; then
a run trains only the ControlNet and exports it as a diffusers folder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import freeanimate_jax
from freeanimate_jax.train import objective, step
from freeanimate_jax.train import state as train_state
from freeanimate_jax.train.settings import NoiseConfig
from freeanimate_jax.weights.convert import export_state_dict
from tests import tiny
from tests.helpers import assert_parity

FRAMES = 2
TIMESTEPS = [10, 500, 999]
PATTERN = r"^controlnet\."
NOISE = NoiseConfig()
CFG = step.StepConfig(noise=NOISE, caption_dropout=0.0, grad_accum=1, seed=0)
# The condition embedding's first convs are drawn at random by both: not comparable.
_RANDOM_INIT = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000)


def test_a_new_controlnet_is_diffusers_from_unet(tmp_path):
    from diffusers import ControlNetModel

    ref_unet = tiny.save_unet(tmp_path / "unet", **tiny.SD1_UNET)
    ref = ControlNetModel.from_unet(ref_unet)
    ours = train_state.new_controlnet(freeanimate_jax.load(tmp_path / "unet"))
    for key, value in ours.config.items():
        if key != "_class_name":
            assert np.array_equal(np.asarray(ref.config[key]), np.asarray(value)), key
    ref_state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    exported = export_state_dict(ours)
    assert set(exported) == set(ref_state)
    compared = zeros = 0
    for name, value in ref_state.items():
        if name.startswith(_RANDOM_INIT):
            continue
        assert np.array_equal(exported[name], value), name
        compared += 1
        zeros += not np.any(value)
    # The copied encoder is non-zero; the zero convs (and the embedding's last conv) are zero.
    assert compared > 100 and 0 < zeros < compared
    assert not np.any(exported["controlnet_mid_block.weight"])
    assert np.any(exported["down_blocks.0.attentions.0.proj_in.weight"])


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_parity")
    unet = tiny.save_unet(root / "unet", **tiny.SD1_UNET)
    cn = tiny.save_controlnet(root / "cn", **tiny.CONTROLNET)  # random non-zero everywhere
    g = torch.Generator().manual_seed(0)
    b = len(TIMESTEPS)
    z0 = torch.randn(b, FRAMES, 4, 8, 8, generator=g)
    noise = torch.randn(b, FRAMES, 4, 8, 8, generator=g)
    cond = torch.rand(b, FRAMES, 3, 64, 64, generator=g)
    ctx = torch.randn(b, 7, 32, generator=g)
    t = torch.tensor(TIMESTEPS)

    # train_controlnet.py's step, the frames of a clip as images.
    unet.requires_grad_(False)
    cn.zero_grad(set_to_none=True)
    fold = lambda x: x.flatten(0, 1)  # noqa: E731
    t_f, ctx_f = t.repeat_interleave(FRAMES), ctx.repeat_interleave(FRAMES, 0)
    noisy = _scheduler().add_noise(fold(z0), fold(noise), t_f)
    down, mid = cn(noisy, t_f, ctx_f, controlnet_cond=fold(cond), return_dict=False)
    pred = unet(noisy, t_f, ctx_f, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    loss = torch.nn.functional.mse_loss(pred.float(), fold(noise).float())
    loss.backward()
    ref_grads = {f"controlnet.{n}": p.grad.numpy().copy() for n, p in cn.named_parameters()}

    model = train_state.ControlledUNet(freeanimate_jax.load(root / "unet"),
                                       freeanimate_jax.load(root / "cn"))
    graphdef, trained, frozen = train_state.split(model, PATTERN)
    nhwc = lambda x: jnp.asarray(x.permute(0, 1, 3, 4, 2).numpy())  # noqa: E731
    inputs = {"z0": nhwc(z0), "noise": nhwc(noise), "t": jnp.asarray(t.numpy()),
              "context": jnp.asarray(ctx.numpy()), "cond": nhwc(cond)}
    value_and_grad = jax.jit(jax.value_and_grad(step.loss_fn), static_argnums=(2, 5))
    our_loss, our_grads = value_and_grad(trained, frozen, graphdef, inputs,
                                         objective.alphas(NOISE), CFG)
    merged = nnx.merge(graphdef, our_grads, frozen, copy=True)
    names = {train_state.path_name(p) for p, _ in nnx.to_flat_state(our_grads)}
    ours = {k: v for k, v in export_state_dict(merged).items() if k in names}
    return {"ref_loss": float(loss.detach()), "loss": float(our_loss), "ref": ref_grads,
            "ours": ours, "frozen": frozen}


def test_loss_and_controlnet_gradients_equal_diffusers(grads):
    assert_parity(grads["loss"], grads["ref_loss"], "loss")
    assert grads["ref_loss"] > 0.1
    assert sorted(grads["ours"]) == sorted(grads["ref"])
    for name, ref in grads["ref"].items():
        assert np.max(np.abs(ref)) > 0, f"{name}: zero reference gradient"
        assert_parity(grads["ours"][name], ref, f"grad {name}")
    frozen = {train_state.path_name(p) for p, _ in
              nnx.to_flat_state(nnx.filter_state(grads["frozen"], nnx.Param))}
    assert frozen and all(p.startswith("unet.") for p in frozen)


def _flat(state) -> dict:
    return {train_state.path_name(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_a_controlnet_run_trains_only_the_controlnet_and_exports_it(tmp_path):
    from diffusers import ControlNetModel

    from freeanimate_jax.train.export import export_run
    from tests.test_train import _job, _trainer

    job = _job(tmp_path, "controlnet=new", "train.motion=none", f"train.trainable={PATTERN}",
               "optim.weight_decay=0.0", "optim.ema_decay=0.5", "train.max_steps=3",
               "train.ckpt_every=3", "data.frames=4", "val.every=3", "val.steps=2")
    trainer = _trainer(job)
    before = _flat(nnx.state(trainer.models.trained_model))
    trained_names = set(_flat(trainer.state["params"]))
    assert trained_names == {k for k in before if k.startswith("controlnet.")}
    from freeanimate_jax.train.validate import validate

    trainer.run(validate=validate)
    after = _flat(trainer.state["params"])
    frozen = _flat(trainer.frozen)
    assert set(frozen) == set(before) - trained_names
    assert all(np.array_equal(v, before[k]) for k, v in frozen.items())
    # At step 1 only the zero convs get a gradient; by step 3 every ControlNet leaf moved.
    assert not [k for k, v in after.items() if np.array_equal(v, before[k])]
    sheet = tmp_path / "run" / "val" / "step_0000003" / "sheet.png"
    assert sheet.is_file() and trainer.val_condition.shape == (4, 64, 64, 3)

    folder = export_run(tmp_path / "run", tmp_path / "cn")
    ema = export_run(tmp_path / "run", tmp_path / "cn_ema", ema=True)
    ours = _flat(nnx.state(freeanimate_jax.load(folder), nnx.Param))
    ours_ema = _flat(nnx.state(freeanimate_jax.load(ema), nnx.Param))
    assert {f"controlnet.{k}" for k in ours} == trained_names
    for name, value in after.items():
        assert np.array_equal(ours[name.removeprefix("controlnet.")], value), name
    assert any(not np.array_equal(ours_ema[k], ours[k]) for k in ours)
    ref = {k: v.detach().numpy() for k, v in ControlNetModel.from_pretrained(folder)
           .state_dict().items()}
    exported = export_state_dict(freeanimate_jax.load(folder))
    assert set(ref) == set(exported)
    assert all(np.array_equal(ref[k], exported[k]) for k in ref)


def test_an_image_stage_run_trains_the_whole_unet_and_exports_it(tmp_path):
    from diffusers import UNet2DConditionModel

    from freeanimate_jax.train.export import export_run
    from tests.test_train import _job, _trainer

    job = _job(tmp_path, "train.motion=none", "train.trainable=.", "train.max_steps=1",
               "train.ckpt_every=1", "data.frames=2")
    trainer = _trainer(job)
    assert type(trainer.models.unet).__name__ == "UNet2DConditionModel"
    assert not jax.tree.leaves(nnx.filter_state(trainer.frozen, nnx.Param))
    trainer.run()
    folder = export_run(tmp_path / "run", tmp_path / "unet")
    ours = _flat(nnx.state(freeanimate_jax.load(folder), nnx.Param))
    assert ours.keys() == _flat(trainer.state["params"]).keys()
    assert all(np.array_equal(ours[k], v) for k, v in _flat(trainer.state["params"]).items())
    ref = UNet2DConditionModel.from_pretrained(folder).state_dict()
    exported = export_state_dict(freeanimate_jax.load(folder))
    assert set(ref) == set(exported)
    assert all(np.array_equal(ref[k].numpy(), exported[k]) for k in ref)
