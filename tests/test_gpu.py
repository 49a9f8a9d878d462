"""GPU-only checks: the cuDNN attention path against the fp32 XLA path, at SD1.5's head
dimensions. Run with `JAX_PLATFORMS=cuda`; on a machine without a GPU (CI) they skip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freeanimate_jax.models.attention import Runtime, dot_product_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


# SD1.5 at 512x512: self-attention over 64x64 / 32x32 / 16x16 latents with 8 heads of width
# 40 / 80 / 160, and cross-attention to 77 text tokens; the motion module's 16-frame attention.
@pytest.mark.parametrize("lq,lk,width", [(4096, 4096, 320), (4096, 77, 320), (1024, 1024, 640),
                                         (256, 256, 1280), (256, 77, 1280), (16, 16, 320)])
def test_cudnn_attention_matches_fp32(lq, lk, width):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, lq, width), jnp.float32)
    k = jax.random.normal(kk, (2, lk, width), jnp.float32)
    v = jax.random.normal(kv, (2, lk, width), jnp.float32)
    xla, cudnn = Runtime(kernel="xla"), Runtime(kernel="cudnn")
    ref = np.asarray(jax.jit(lambda a, b, c: dot_product_attention(a, b, c, 8, runtime=xla))(
        q, k, v))
    bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    fn = jax.jit(lambda a, b, c: dot_product_attention(a, b, c, 8, runtime=cudnn))
    hlo = fn.lower(*bf).as_text()
    out = np.asarray(fn(*bf).astype(jnp.float32))
    assert "cudnn" in hlo, "cuDNN path not taken"
    # bf16 inputs carry 8 bits of mantissa: ~4e-3 relative per element, averaged over keys.
    assert np.abs(out - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())


def test_training_step_on_the_gpu_matches_the_fp32_xla_step(tmp_path):
    """The trainer's step as `freeanimate train run` builds it on a GPU (bf16 compute, the
    cuDNN attention kernel of the mesh's platform, fp32 trained weights), against the same step
    in fp32 with XLA attention: the same loss to bf16 accuracy, a finite gradient, and the
    trained parameters moved."""
    import dataclasses

    from freeanimate_jax import config as cfg
    from freeanimate_jax import parallel
    from freeanimate_jax.train import objective
    from freeanimate_jax.train import step as sp
    from freeanimate_jax.train.data import open_data
    from freeanimate_jax.train.loop import Trainer, build_models

    job = cfg.load_job(None, [f"train.output_dir={tmp_path / 'run'}", "val.every=0",
                              "train.tensorboard=false", "data.synthetic_videos=8",
                              "size=128", "data.frames=8", "train.global_batch=2",
                              "compilation_cache="],
                       base=cfg.DEMO_TRAIN_CONFIG, schema=cfg.TrainJob)
    mesh = parallel.data_mesh(jax.devices()[:1])
    data = open_data(job, 1)
    losses = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        t = Trainer(job, build_models(job, dtype), data, mesh, compute_dtype=dtype,
                    log=lambda s: None)
        batch = t.device_batch(data.batch(0))
        if dtype == jnp.bfloat16:
            assert t.cfg.runtime.kernel == "cudnn"
            hlo = t.step_fn.lower(t.state, batch, t.frozen, t.encoders).as_text()
            assert "cudnn" in hlo, "cuDNN attention not in the training step"
        else:  # the reference: the same step with XLA attention
            xla = dataclasses.replace(t.cfg, runtime=Runtime(kernel="xla"))
            t.step_fn = sp.make_step(t.graphdef, t.tx, t.lr, objective.alphas(t.noise), xla,
                                     t.encoder_graphs, t.state_shardings)
        before = jax.tree.map(np.asarray, t.state["params"])
        state, m = t.step_fn(t.state, batch, t.frozen, t.encoders)
        assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
        assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                                state["params"], before)))
        losses[dtype] = float(m["loss"])
    assert abs(losses[jnp.bfloat16] - losses[jnp.float32]) <= 0.05 * losses[jnp.float32]
