"""The trainer as `freeanimate train run` assembles it: freezing, zero init, learning, the
latent cache against encoding on the fly, export, and bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from freeanimate_jax import config as cfg
from freeanimate_jax import parallel
from freeanimate_jax.train import objective
from freeanimate_jax.train import step as sp
from freeanimate_jax.train.data import open_data
from freeanimate_jax.train.loop import Trainer, build_models
from freeanimate_jax.train.state import path_name


def _job(tmp_path, *overrides):
    return cfg.load_job(None, [f"train.output_dir={tmp_path / 'run'}", "val.every=0",
                               "train.tensorboard=false", "data.synthetic_videos=16",
                               "compilation_cache=", *overrides],
                        base=cfg.DEMO_TRAIN_CONFIG, schema=cfg.TrainJob)


def _mesh():
    return parallel.make_mesh(frames=1, data=1, devices=jax.devices()[:1])


def _trainer(job):
    models = build_models(job, jnp.float32)
    return Trainer(job, models, open_data(job, 1), _mesh(), log=lambda s: None)


def _flat(state) -> dict:
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_frozen_leaves_stay_bit_identical_and_every_trained_leaf_changes(tmp_path):
    job = _job(tmp_path, "optim.weight_decay=0.0", "train.max_steps=4", "train.ckpt_every=4")
    trainer = _trainer(job)
    before = _flat(nnx.state(trainer.models.unet))
    trained_names = set(_flat(trainer.state["params"]))
    assert trained_names and all(".motion_modules." in f".{k}" for k in trained_names)
    assert trained_names == {k for k in before if ".motion_modules." in f".{k}"}
    trainer.run()
    after_trained = _flat(trainer.state["params"])
    after_frozen = _flat(trainer.frozen)
    assert set(after_frozen) == set(before) - trained_names
    for k, v in after_frozen.items():
        assert np.array_equal(v, before[k]), f"frozen {k} changed"
    unchanged = [k for k, v in after_trained.items() if np.array_equal(v, before[k])]
    assert not unchanged, f"trained leaves that did not move: {unchanged[:3]}"
    # Optimizer state: moments for the trained leaves only (plus scalar counts).
    opt_arrays = [x for x in jax.tree.leaves(trainer.state["opt"]) if np.ndim(x) > 0]
    assert len(opt_arrays) == 2 * len(trained_names)
    # The checkpoint holds the trained leaves only.
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    saved = mgr.restore(4, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    saved_names = {path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved["params"])}
    assert saved_names == trained_names
    assert set(mgr.item_metadata(4).keys()) >= {"params", "opt", "record"}


def _predict(unet, z, t, ctx):
    return np.asarray(unet(z, t, ctx))


def test_a_new_module_leaves_the_image_model_unchanged(tmp_path):
    from freeanimate_jax.demo import tiny_models
    from freeanimate_jax.pipelines.generate import Generate
    from freeanimate_jax.pipelines.settings import GenerateSettings

    job = _job(tmp_path)
    models = build_models(job, jnp.float32)
    image = tiny_models(0)
    key = jax.random.key(0)
    z = jax.random.normal(key, (1, 8, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (1, 77, 32))
    t = jnp.array([500])
    video_eps = _predict(models.unet, z, t, ctx)
    image_eps = np.asarray(image.unet(z[0], t, jnp.repeat(ctx, 8, 0)))
    assert np.array_equal(video_eps[0], image_eps)
    # Sampled through the shared core: the zero-initialised module's frames equal the frames
    # of the same UNet with its motion modules taken out (each frame an image).
    settings = GenerateSettings(frames=8, steps=3, guidance_scale=4.0, seed=0)
    pipe_models = dataclasses.replace(image, unet=models.unet, controlnet=None)
    with_module = Generate(pipe_models, settings)("a red square moving left", (64, 64)).frames
    bare = build_models(job, jnp.float32).unet
    for block in (*bare.down_blocks, *bare.up_blocks, bare.mid_block):
        if block is not None and getattr(block, "motion_modules", None) is not None:
            block.motion_modules = None
    without = Generate(dataclasses.replace(pipe_models, unet=bare), settings)(
        "a red square moving left", (64, 64)).frames
    assert np.array_equal(np.asarray(with_module), np.asarray(without))
    # A module with a non-zero proj_out changes them.
    proj = models.adapter.down_blocks[0].motion_modules[0].proj_out
    proj.weight.set_value(jnp.full_like(proj.weight[...], 0.05))
    assert not np.array_equal(_predict(models.unet, z, t, ctx), video_eps)


def _heldout_loss(trainer, batch, seed=123) -> float:
    """The loss on a fixed batch with fixed timesteps, noise and no caption dropout."""
    cfg_fixed = dataclasses.replace(trainer.cfg, caption_dropout=0.0, seed=seed)
    host = trainer.device_batch(batch)
    enc = tuple(nnx.merge(g, s) for g, s in zip(trainer.encoder_graphs, trainer.encoders,
                                                strict=True))
    mean, logstd, ctx, empty = sp.posterior(host, enc)
    d = sp.draws(cfg_fixed, jnp.int32(0), mean.shape[0])
    inputs = sp.model_inputs(cfg_fixed, d, mean, logstd, ctx, empty)
    return float(sp.loss_fn(trainer.state["params"], trainer.frozen, trainer.graphdef, inputs,
                            objective.alphas(trainer.noise), cfg_fixed))


def test_it_learns_on_the_synthetic_clips(tmp_path):
    job = _job(tmp_path, "train.max_steps=120", "train.ckpt_every=1000",
               "data.synthetic_videos=32")
    trainer = _trainer(job)
    from freeanimate_jax.data.pipeline import TrainData
    from freeanimate_jax.data.synthetic import SyntheticSource

    held = TrainData(SyntheticSource(num_videos=8, num_frames=12, size=64, seed=99), frames=8,
                     stride=1, size=64, seed=5, batch_per_host=8, hflip=False).batch(0)
    first = _heldout_loss(trainer, held)
    result = trainer.run()
    last = _heldout_loss(trainer, held)
    losses = result["losses"]
    print(f"held-out loss {first:.4f} -> {last:.4f}; train loss first 20 "
          f"{np.mean(losses[:20]):.4f}, last 20 {np.mean(losses[-20:]):.4f}")
    assert last <= 0.9 * first
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:20])


def test_a_bfloat16_latent_cache_reads_back_as_bfloat16_and_trains(tmp_path):
    """`train cache` writes bfloat16 by default: every array, the shared empty-prompt embedding
    included, reads back as the float32 cache rounded to bfloat16, and a step runs on it."""
    import ml_dtypes

    from freeanimate_jax.train.cache import LatentData, LatentSource, write_cache
    from freeanimate_jax.train.data import source_of

    job = _job(tmp_path, "data.hflip=false")
    trainer = _trainer(job)
    m = trainer.models
    batches = {}
    for dtype in ("float32", "bfloat16"):
        write_cache(source_of(job), tmp_path / dtype, m.vae, m.text_encoder, m.tokenizer,
                    size=64, dtype=dtype, log=lambda s: None)
        batches[dtype] = LatentData(LatentSource(tmp_path / dtype), frames=8, stride=1,
                                    size=64, seed=0, batch_per_host=4).batch(0)
    for key in ("mean", "logstd", "context", "empty"):
        got, ref = batches["bfloat16"][key], batches["float32"][key]
        assert got.dtype == ml_dtypes.bfloat16, key
        assert np.array_equal(got.view(np.uint16), ref.astype(ml_dtypes.bfloat16).view(np.uint16))
    job_c = _job(tmp_path, "data.hflip=false", "data.source=latents",
                 f"data.dir={tmp_path / 'bfloat16'}")
    trainer_c = Trainer(job_c, m, open_data(job_c, 1), _mesh(), log=lambda s: None)
    _, metrics = trainer_c.step_fn(trainer_c.state, trainer_c.device_batch(batches["bfloat16"]),
                                   trainer_c.frozen, None)
    assert np.isfinite(float(metrics["loss"]))


def test_the_latent_cache_gives_the_loss_of_encoding_on_the_fly(tmp_path):
    from freeanimate_jax.train.cache import LatentData, LatentSource, write_cache
    from freeanimate_jax.train.data import source_of

    job = _job(tmp_path, "data.hflip=false", "data.caption_dropout=0.5")
    trainer = _trainer(job)
    m = trainer.models
    write_cache(source_of(job), tmp_path / "cache", m.vae, m.text_encoder, m.tokenizer,
                size=64, dtype="float32", log=lambda s: None)
    cached = LatentData(LatentSource(tmp_path / "cache"), frames=8, stride=1, size=64, seed=0,
                        batch_per_host=4)
    live = trainer.data
    assert np.array_equal(cached.batch(0)["index"], live.batch(0)["index"])
    job_c = _job(tmp_path, "data.hflip=false", "data.caption_dropout=0.5",
                 "data.source=latents", f"data.dir={tmp_path / 'cache'}")
    trainer_c = Trainer(job_c, m, open_data(job_c, 1), _mesh(), log=lambda s: None)
    state0 = jax.tree.map(jnp.copy, trainer.state)
    _, m_live = trainer.step_fn(state0, trainer.device_batch(live.batch(0)), trainer.frozen,
                                trainer.encoders)
    _, m_cache = trainer_c.step_fn(trainer_c.state, trainer_c.device_batch(cached.batch(0)),
                                   trainer_c.frozen, None)
    assert abs(float(m_live["loss"]) - float(m_cache["loss"])) <= 1e-5
    # Resuming the cache writer skips complete shards and rewrites nothing.
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.array_record"))
    write_cache(source_of(job), tmp_path / "cache", m.vae, m.text_encoder, m.tokenizer,
                size=64, dtype="float32", log=lambda s: None)
    after = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.array_record"))
    assert before == after


def test_export_loads_in_ours_and_in_diffusers_with_the_trained_values(tmp_path):
    import torch
    from diffusers import MotionAdapter as TorchAdapter

    import freeanimate_jax
    from freeanimate_jax.train.export import export_run
    from freeanimate_jax.weights.motion import load_motion_module

    job = _job(tmp_path, "train.max_steps=2", "train.ckpt_every=2")
    trainer = _trainer(job)
    trainer.run()
    trained = _flat(trainer.state["params"])
    folder = export_run(tmp_path / "run", tmp_path / "adapter")
    single = export_run(tmp_path / "run", tmp_path / "mm.safetensors", layout="original")
    ours = _flat(nnx.state(freeanimate_jax.load(folder), nnx.Param))
    ours_file = _flat(nnx.state(load_motion_module(single), nnx.Param))
    assert set(ours) == set(trained) == set(ours_file)
    for k, v in trained.items():
        assert np.array_equal(ours[k], v) and np.array_equal(ours_file[k], v), k
    assert json.loads((folder / "config.json").read_text())["_norm_per_frame"] is True
    ref = TorchAdapter.from_pretrained(folder)
    ref_state = {k: v.detach().numpy() for k, v in ref.state_dict().items()
                 if not k.endswith("pe")}
    from freeanimate_jax.weights.convert import export_state_dict

    exported = export_state_dict(freeanimate_jax.load(folder))
    assert set(ref_state) == set(exported)
    for k, v in ref_state.items():
        assert np.array_equal(v, exported[k]), k
    assert all("motion_modules" in k for k in ref_state)
    assert torch.is_tensor(next(iter(ref.state_dict().values())))


@pytest.mark.parametrize("overrides, expected", [
    (["data.source=frames", "data.dir={tmp}/nothing"], "no prepared dataset"),
    (["data.frames=40"], "position table"),
    (["train.global_batch=3"], "does not split over 8 devices"),
    (["train.trainable=no_such_layer"], "matches no parameter"),
    (["model={tmp}/not_a_model"], "expected a diffusers SD 1.x folder"),
    (["optim.lr=fast"], "config key 'optim.lr' = 'fast' has the wrong type"),
    (["train.output_dir=gs://bucket/run"], "mount a bucket with gcsfuse"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, expected):
    from freeanimate_jax.cli import main

    out = tmp_path / "run"
    args = [o.format(tmp=tmp_path) for o in overrides]
    code = main(["train", "run", "--demo", f"train.output_dir={out}", "val.every=0",
                 "compilation_cache=", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (out / "checkpoints").exists()


def test_an_empty_dataset_is_one_line(tmp_path, capsys):
    from freeanimate_jax.cli import main

    manual = tmp_path / "webvid"
    manual.mkdir()
    (manual / "results.csv").write_text("videoid,name,page_dir\n")
    code = main(["train", "prepare-data", "--demo", "data.source=frames",
                 f"data.manual_dir={manual}", f"data.dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.array_record"))


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    from freeanimate_jax.train.loop import TrainError

    job = _job(tmp_path, "train.max_steps=5", "train.ckpt_every=1")
    trainer = _trainer(job)
    clean = trainer.data.batch

    def batch(step):  # a corrupt clip (NaN pixels) at the third step
        out = clean(step)
        if step == 2:
            out = dict(out, pixels=np.full_like(out["pixels"], np.nan))
        return out

    trainer.data.batch = batch
    with pytest.raises(TrainError, match=r"non-finite loss \(nan\) at step 3.*checkpoint is "
                                         r"step 2"):
        trainer.run()
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps == [1, 2]


def test_the_cache_command_feeds_a_run(tmp_path, capsys):
    from freeanimate_jax.cli import main

    common = ["--demo", "compilation_cache=", "data.synthetic_videos=16", "train.global_batch=8"]
    assert main(["train", "cache", *common, "--out", str(tmp_path / "cache")]) == 0
    meta = json.loads((tmp_path / "cache" / "latents.json").read_text())
    assert meta["count"] == 16 and meta["dtype"] == "float32"
    code = main(["train", "run", *common, "data.source=latents", f"data.dir={tmp_path / 'cache'}",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "val.every=0",
                 "train.tensorboard=false"])
    assert code == 0, capsys.readouterr().err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert all(np.isfinite(json.loads(x)["loss"]) for x in lines)


def test_the_ema_follows_the_trained_weights_and_is_saved_beside_them(tmp_path):
    import orbax.checkpoint as ocp

    decay = 0.75
    job = _job(tmp_path, f"optim.ema_decay={decay}", "train.max_steps=2", "train.ckpt_every=2")
    trainer = _trainer(job)
    seen = [_flat(trainer.state["params"])]
    assert all(np.array_equal(v, seen[0][k]) for k, v in _flat(trainer.state["ema"]).items())
    for s in range(2):  # the run's own step function, batch by batch
        batch = trainer.device_batch(trainer.data.batch(s))
        trainer.state, _ = trainer.step_fn(trainer.state, batch, trainer.frozen,
                                           trainer.encoders)
        seen.append(_flat(trainer.state["params"]))
    ema = _flat(trainer.state["ema"])
    for k, v in ema.items():  # e_n = d e_(n-1) + (1 - d) p_n, from e_0 = p_0
        e1 = decay * seen[0][k] + (1 - decay) * seen[1][k]
        expected = decay * e1 + (1 - decay) * seen[2][k]
        np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-7, err_msg=k)
    assert any(not np.array_equal(ema[k], seen[2][k]) for k in ema)
    trainer.ckpt.save(trainer.state, trainer.record(2))
    trainer.ckpt.close()
    mgr = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    saved = mgr.restore(2, args=ocp.args.Composite(ema=ocp.args.StandardRestore()))
    assert _flat(saved["ema"]).keys() == ema.keys()
