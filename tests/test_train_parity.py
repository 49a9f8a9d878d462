"""The trainer against PyTorch and diffusers: the loss and the motion modules' gradients
(UNetMotionModel + DDPMScheduler), one clipped AdamW step (torch.optim), gradient accumulation,
the v-prediction target, Min-SNR weights, the learning-rate schedules, remat and offset noise."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import freeanimate_jax
from freeanimate_jax.models.motion import UNetMotionModel
from freeanimate_jax.train import objective, step
from freeanimate_jax.train import state as train_state
from freeanimate_jax.train.settings import LoopConfig, NoiseConfig, OptimConfig
from freeanimate_jax.weights.convert import export_state_dict
from tests import tiny
from tests.helpers import assert_parity

FRAMES = 4
TIMESTEPS = [10, 500, 999]  # one per example: low, middle and the last noise level
MOTION = "motion_modules"
NOISE = NoiseConfig()
CFG = step.StepConfig(noise=NOISE, caption_dropout=0.0, grad_accum=1, seed=0)
# AdamW's hyper-parameters for the optimizer test (lr large enough for a visible update).
# The LLVM backend unoptimised: the same XLA program, compiled in about half the time.
FAST = {"xla_backend_optimization_level": 0}
OPTIM = OptimConfig(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000)


def _nfhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())  # (B, C, F, H, W) -> (B, F, H, W, C)


def _value_and_grad():
    return jax.jit(jax.value_and_grad(step.loss_fn), static_argnums=(2, 5),
                   compiler_options=FAST)


def _paths(tree) -> set[str]:
    return {train_state.path_name(p) for p, _ in nnx.to_flat_state(tree)}


def _torch_layout(graphdef, trained, frozen) -> dict[str, np.ndarray]:
    """`trained` (params, or gradients shaped like them) in PyTorch names and layouts."""
    names = _paths(trained)
    exported = export_state_dict(nnx.merge(graphdef, trained, frozen, copy=True))
    return {k: v for k, v in exported.items() if k in names}


def _max_err(a, b) -> float:
    return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import UNetMotionModel as TorchMotion

    root = tmp_path_factory.mktemp("train_parity")
    unet2d = tiny.save_unet(root / "unet", **tiny.SD1_UNET)
    adapter = tiny.save_motion_adapter(root / "adapter", **tiny.MOTION_ADAPTER)
    ref = TorchMotion.from_unet2d(unet2d, adapter).eval()
    # diffusers' folders: our adapter normalises across frames, as diffusers does.
    ours = UNetMotionModel.from_unet2d(freeanimate_jax.load(root / "unet"),
                                       freeanimate_jax.load(root / "adapter"))
    return ref, ours


@pytest.fixture(scope="module")
def grads(pair):
    """The loss and the motion modules' gradients, in PyTorch and in ours, on one batch."""
    ref, ours = pair
    g = torch.Generator().manual_seed(0)
    b = len(TIMESTEPS)
    z0 = torch.randn(b, 4, FRAMES, 8, 8, generator=g)
    noise = torch.randn(b, 4, FRAMES, 8, 8, generator=g)
    ctx = torch.randn(b, 7, 32, generator=g)
    t = torch.tensor(TIMESTEPS)

    ref.freeze_unet2d_params()
    ref.zero_grad(set_to_none=True)
    noisy = _scheduler().add_noise(z0, noise, t)
    pred = ref(noisy, t, ctx.repeat_interleave(FRAMES, 0)).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    ref_grads = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()
                 if p.grad is not None}
    trainable = sorted(n for n, p in ref.named_parameters() if p.requires_grad)

    graphdef, trained, frozen = train_state.split(ours, MOTION)
    inputs = {"z0": _nfhwc(z0), "noise": _nfhwc(noise), "t": jnp.asarray(t.numpy()),
              "context": jnp.asarray(ctx.numpy())}
    our_loss, our_grads = _value_and_grad()(trained, frozen, graphdef, inputs,
                                            objective.alphas(NOISE), CFG)
    return {"ref_loss": float(loss.detach()), "ref_grads": ref_grads, "trainable": trainable,
            "loss": float(our_loss), "grads": our_grads, "graphdef": graphdef,
            "trained": trained, "frozen": frozen}


def test_loss_and_motion_gradients_equal_diffusers(grads):
    assert_parity(grads["loss"], grads["ref_loss"], "loss")
    assert grads["ref_loss"] > 0.1  # a real loss, not a degenerate zero prediction

    ref_grads, trainable = grads["ref_grads"], grads["trainable"]
    # diffusers' own freeze leaves exactly the parameters our pattern trains.
    assert trainable == sorted(n for n in ref_grads if MOTION in n)
    assert set(ref_grads) == set(trainable)

    ours = _torch_layout(grads["graphdef"], grads["grads"], grads["frozen"])
    assert sorted(ours) == trainable
    compared = 0
    for name in trainable:
        assert np.max(np.abs(ref_grads[name])) > 0, f"{name}: zero reference gradient"
        assert_parity(ours[name], ref_grads[name], f"grad {name}")
        compared += 1
    assert compared == len(ref_grads) == len(jax.tree.leaves(grads["grads"]))

    # The gradient covers the trained split only: no frozen parameter has one.
    trained, frozen = _paths(grads["trained"]), _paths(grads["frozen"])
    assert _paths(grads["grads"]) == trained
    assert all(MOTION in p for p in trained)
    assert not trained & frozen
    frozen_params = _paths(nnx.filter_state(grads["frozen"], nnx.Param))
    assert frozen_params and not any(MOTION in p for p in frozen_params)


def _torch_adamw(params: dict[str, np.ndarray], steps: list[dict[str, np.ndarray]], clip: bool
                 ) -> dict[str, np.ndarray]:
    names = sorted(params)
    tensors = [torch.tensor(params[n]).requires_grad_() for n in names]
    opt = torch.optim.AdamW(tensors, lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    for g in steps:
        for n, p in zip(names, tensors, strict=True):
            p.grad = torch.tensor(g[n])
        if clip:
            torch.nn.utils.clip_grad_norm_(tensors, OPTIM.grad_clip)
        opt.step()
    return {n: p.detach().numpy() for n, p in zip(names, tensors, strict=True)}


def test_clipped_adamw_steps_equal_torch(grads):
    graphdef, trained, frozen = grads["graphdef"], grads["trained"], grads["frozen"]
    g1 = grads["grads"]
    g2 = jax.tree.map(lambda x: -0.5 * x, g1)
    # Both steps clip (norm > 1), and the second's clip factor differs from the first's, so
    # the clipped AdamW result differs from the unclipped one.
    norm = float(optax.tree.norm(g1))
    assert 0.5 * norm > OPTIM.grad_clip, f"global norm {norm} too small for an active clip"

    tx = train_state.optimizer(OPTIM, max_steps=10)
    state = train_state.init_state(trained, tx, OPTIM)
    params, opt = state["params"], state["opt"]
    for g in (g1, g2):
        updates, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, updates)

    start = _torch_layout(graphdef, trained, frozen)
    torch_grads = [_torch_layout(graphdef, g, frozen) for g in (g1, g2)]
    expected = _torch_adamw(start, torch_grads, clip=True)
    ours = _torch_layout(graphdef, params, frozen)
    assert sorted(ours) == sorted(expected) == grads["trainable"]
    moved = max(float(np.max(np.abs(expected[n] - start[n]))) for n in expected)
    assert moved > 0.5 * OPTIM.lr  # the update is visible at the tolerance
    for name in expected:
        assert_parity(ours[name], expected[name], f"param {name}")

    unclipped = _torch_adamw(start, torch_grads, clip=False)
    gap = max(float(np.max(np.abs(unclipped[n] - expected[n]))) for n in expected)
    assert gap > 10 * 1e-4  # the comparison would catch a missing clip


# -- a smaller UNet (one layer per block, no mid-block module) for the compile-heavy tests --

SMALL_UNET = dict(tiny.SD1_UNET, layers_per_block=1)
SMALL_ADAPTER = dict(tiny.MOTION_ADAPTER, motion_layers_per_block=1, use_motion_mid_block=False)
# One jitted `_grads` for every small-model test, so equal programs compile once.
GRADS = jax.jit(step._grads, static_argnums=(2, 5), compiler_options=FAST)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_small")
    tiny.save_unet(root / "unet", seed=3, **SMALL_UNET)
    tiny.save_motion_adapter(root / "adapter", seed=4, **SMALL_ADAPTER)
    model = UNetMotionModel.from_unet2d(freeanimate_jax.load(root / "unet"),
                                        freeanimate_jax.load(root / "adapter"))
    train_state.set_remat(model, LoopConfig(remat="none"))  # as the trainer sets it
    return model


def _inputs(seed: int, batch: int = 4):
    r = np.random.default_rng(seed)
    shape = (batch, FRAMES, 8, 8, 4)
    return {"z0": jnp.asarray(r.standard_normal(shape), jnp.float32),
            "noise": jnp.asarray(r.standard_normal(shape), jnp.float32),
            "t": jnp.asarray(r.choice(1000, batch, replace=False), jnp.int32),
            "context": jnp.asarray(r.standard_normal((batch, 7, 32)), jnp.float32)}


def _assert_close(ours, ref, what: str, tol: float) -> float:
    err = 0.0
    for (path, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(ref), strict=True):
        err = max(err, assert_parity(a, b, f"{what} {train_state.path_name(path)}", tol=tol))
    return err


def test_grad_accumulation_equals_one_batch(small):
    # k micro-batches of b = the batch k*b in one: the mean of equal-size means.
    graphdef, trained, frozen = train_state.split(small, MOTION)
    inputs, alphas = _inputs(0), objective.alphas(NOISE)
    loss1, g1 = GRADS(trained, frozen, graphdef, inputs, alphas, CFG)
    loss2, g2 = GRADS(trained, frozen, graphdef, inputs, alphas,
                      dataclasses.replace(CFG, grad_accum=2))
    assert_parity(loss2, loss1, "accumulated loss", tol=1e-5)
    _assert_close(g2, g1, "accumulated grad", tol=1e-5)
    assert float(loss1) > 0.1 and float(optax.tree.norm(g1)) > 0.1


def test_make_step_with_grad_accumulation_equals_one_batch(small):
    graphdef, trained, frozen = train_state.split(small, MOTION)
    # Adam's first update is lr x g / (|g| + eps), about lr x sign(g): with eps 1e-8, a
    # gradient entry near 1e-7 turns a float rounding difference into an O(lr) update
    # difference. A larger eps keeps the update a smooth function of the gradient.
    optim = OptimConfig(lr=1e-3, eps=1e-4)
    tx, lr = train_state.optimizer(optim, 10), train_state.learning_rate(optim, 10)
    r = np.random.default_rng(1)
    b = 4
    batch = {"mean": jnp.asarray(r.standard_normal((b, FRAMES, 8, 8, 4)), jnp.float32),
             "logstd": jnp.asarray(r.uniform(-3, -1, (b, FRAMES, 8, 8, 4)), jnp.float32),
             "context": jnp.asarray(r.standard_normal((b, 7, 32)), jnp.float32),
             "empty": jnp.asarray(r.standard_normal((7, 32)), jnp.float32)}
    noise = NoiseConfig(offset=0.1)
    results = {}
    for k in (1, 2):
        cfg = step.StepConfig(noise=noise, caption_dropout=0.5, grad_accum=k, seed=7)
        fn = step.make_step(graphdef, tx, lr, objective.alphas(noise), cfg)
        start = train_state.init_state(jax.tree.map(jnp.copy, trained), tx, optim)
        compiled = fn.lower(start, batch, frozen, None).compile(compiler_options=FAST)
        results[k] = compiled(start, batch, frozen, None)
    (s1, m1), (s2, m2) = results[1], results[2]
    assert int(s1["step"]) == int(s2["step"]) == 1
    np.testing.assert_array_equal(m1["t"], m2["t"])  # drawn for the global batch
    assert_parity(m2["loss"], m1["loss"], "loss", tol=1e-5)
    assert_parity(m2["grad_norm"], m1["grad_norm"], "grad norm", tol=1e-5)
    _assert_close(s2["params"], s1["params"], "param", tol=1e-5)
    assert _max_err(s1["params"], trained) > 0.5 * optim.lr  # the step moved the params


def test_v_prediction_target_equals_diffusers_get_velocity():
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 10, 250, 500, 777, 998, 999])
    z0 = torch.randn(len(t), FRAMES, 8, 8, 4, generator=g)
    noise = torch.randn(len(t), FRAMES, 8, 8, 4, generator=g)
    expected = _scheduler().get_velocity(z0, noise, t).numpy()
    alphas = objective.alphas(NoiseConfig(prediction_type="v_prediction"))
    ours = objective.target(alphas, jnp.asarray(z0.numpy()), jnp.asarray(noise.numpy()),
                            jnp.asarray(t.numpy()), "v_prediction")
    err = np.max(np.abs(np.asarray(ours) - expected))
    assert err <= 1e-6, err
    eps = objective.target(alphas, jnp.asarray(z0.numpy()), jnp.asarray(noise.numpy()),
                           jnp.asarray(t.numpy()), "epsilon")
    np.testing.assert_array_equal(eps, noise.numpy())
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        objective.target(alphas, jnp.asarray(z0.numpy()), jnp.asarray(noise.numpy()),
                         jnp.asarray(t.numpy()), "sample")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_diffusers_recipe(prediction):
    from diffusers.training_utils import compute_snr

    gamma = 5.0
    t = torch.arange(1000)
    snr = compute_snr(_scheduler(), t)
    weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction == "epsilon" else weights / (snr + 1)

    alphas = objective.alphas(NOISE)
    np.testing.assert_allclose(objective.snr(alphas, jnp.asarray(t.numpy())), snr.numpy(),
                               rtol=1e-6)
    ours = objective.loss_weights(alphas, jnp.asarray(t.numpy()), gamma, prediction)
    np.testing.assert_allclose(ours, weights.numpy(), rtol=1e-6, atol=1e-7)
    # Clipped where SNR > gamma (low t), so the weights are not all one.
    assert float(jnp.min(ours)) < 0.01
    assert 0.8 < float(jnp.max(ours)) <= (1.0 if prediction == "epsilon" else gamma / (gamma + 1))
    assert objective.loss_weights(alphas, jnp.asarray(t.numpy()), None, prediction) is None

    # The weighted loss: diffusers' per-example means x weights, then the batch mean.
    g = torch.Generator().manual_seed(4)
    idx = torch.tensor([0, 3, 400, 999])
    pred = torch.randn(4, FRAMES, 8, 8, 4, generator=g)
    tgt = torch.randn(4, FRAMES, 8, 8, 4, generator=g)
    per = torch.nn.functional.mse_loss(pred, tgt, reduction="none").mean(dim=[1, 2, 3, 4])
    expected = float((per * weights[idx]).mean())
    got = objective.mse(jnp.asarray(pred.numpy()), jnp.asarray(tgt.numpy()),
                        ours[jnp.asarray(idx.numpy())])
    assert float(got) == pytest.approx(expected, rel=1e-6)


def _numpy_schedule(kind: str, lr: float, warmup: int, decay: int, end: float, s: int) -> float:
    if s < warmup:
        return lr * s / warmup
    frac = min(s - warmup, decay) / decay
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr + (end - lr) * frac
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_learning_rate_schedules_equal_optax(kind):
    lr, warmup, decay, factor = 1e-3, 10, 100, 0.1
    end = lr * factor
    optim = OptimConfig(lr=lr, schedule=kind, warmup_steps=warmup, decay_steps=decay,
                        end_lr_factor=factor)
    ours = train_state.learning_rate(optim, max_steps=1000)
    # decay_steps 0: decay until max_steps.
    until_max = train_state.learning_rate(
        OptimConfig(lr=lr, schedule=kind, warmup_steps=warmup, end_lr_factor=factor),
        max_steps=warmup + decay)
    warm = optax.linear_schedule(0.0, lr, warmup)
    if kind == "cosine":
        ref = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay, end)
    elif kind == "constant":
        ref = optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
    else:
        ref = optax.join_schedules([warm, optax.linear_schedule(lr, end, decay)], [warmup])
    steps = range(121)
    got = np.array([float(ours(s)) for s in steps])
    np.testing.assert_allclose(got, [float(ref(s)) for s in steps], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([float(until_max(s)) for s in steps], got, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        got, [_numpy_schedule(kind, lr, warmup, decay, end, s) for s in steps],
        rtol=1e-5, atol=1e-11)
    assert got[0] == 0.0 and got[warmup] == pytest.approx(lr)


def test_learning_rate_without_warmup_starts_at_the_peak():
    ours = train_state.learning_rate(OptimConfig(lr=3e-4), max_steps=50)
    assert [float(ours(s)) for s in (0, 1, 49, 200)] == pytest.approx([3e-4] * 4)


def test_remat_leaves_loss_and_gradients_equal(small):
    inputs, alphas = _inputs(0), objective.alphas(NOISE)

    def run(policy: str):
        # The graphdef holds the policy (a static attribute): split after setting it.
        train_state.set_remat(small, LoopConfig(remat=policy))
        try:
            graphdef, trained, frozen = train_state.split(small, MOTION)
        finally:
            train_state.set_remat(small, LoopConfig(remat="none"))
        args = (trained, frozen, graphdef, inputs, alphas, CFG)
        jaxpr = str(jax.make_jaxpr(step._grads, static_argnums=(2, 5))(*args))
        return GRADS(*args), jaxpr

    remat = re.compile(r"= remat\w*\[")  # jax.checkpoint's primitive (remat2)
    (loss, grads), plain = run("none")
    assert not remat.search(plain)
    for policy, saves in (("full", "policy=None"),
                          ("dots_no_batch", "policy=DotsSaveable(only_if_no_batch_dims=True)")):
        (loss_r, grads_r), jaxpr = run(policy)
        # Each UNet block (2 down, the mid block, 2 up) is rematerialised, with its policy.
        assert len(remat.findall(jaxpr)) == 5, f"{policy}: no remat in the program"
        assert jaxpr.count(saves) == 5, policy
        assert abs(float(loss_r) - float(loss)) <= 1e-6
        assert _max_err(grads_r, grads) <= 1e-6, policy
    assert float(optax.tree.norm(grads)) > 0.1


def test_offset_noise_is_shared_by_frames_and_positions():
    key = jax.random.key(5)
    shape = (3, FRAMES, 6, 5, 4)
    plain = objective.video_noise(key, shape, 0.0)
    offset = objective.video_noise(key, shape, 0.3)
    diff = np.asarray(offset - plain)
    per_video = diff[:, :1, :1, :1, :]
    np.testing.assert_allclose(diff, np.broadcast_to(per_video, shape), atol=1e-6)
    assert np.all(np.abs(per_video) > 1e-4)  # non-zero for every (video, channel)
    assert np.unique(np.round(per_video, 5)).size == shape[0] * shape[-1]  # each its own
    assert np.max(np.abs(per_video)) < 0.3 * 5  # offset x N(0, 1)
    assert abs(float(np.std(np.asarray(plain))) - 1.0) < 0.1
