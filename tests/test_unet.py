"""UNet2DConditionModel parity with diffusers on tiny random SD1- and SD2-style configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import freeanimate_jax
from tests import tiny
from tests.helpers import assert_parity, nchw_to_nhwc


def _inputs(seed: int, size: int, cross_dim: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 7, cross_dim, generator=g)
    t = torch.tensor([10, 731][:batch])
    return x, t, ctx


@pytest.mark.parametrize("config", [tiny.SD1_UNET, tiny.SD2_UNET], ids=["sd1_conv", "sd2_linear"])
def test_unet_parity(tmp_path, config):
    ref_model = tiny.save_unet(tmp_path, **config)
    ours = freeanimate_jax.load(tmp_path)
    x, t, ctx = _inputs(0, 16, config["cross_attention_dim"])
    with torch.no_grad():
        ref = ref_model(x, t, ctx).sample
    out = ours(jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    assert float(ref.abs().max()) > 0.1  # a live reference, not a near-zero output
    assert_parity(out, nchw_to_nhwc(ref), "unet output")


def test_unet_parity_odd_size_and_scalar_timestep(tmp_path):
    """A latent size not divisible by the upsampling factor takes diffusers' upsample_size path."""
    ref_model = tiny.save_unet(tmp_path, **tiny.SD1_UNET)
    ours = freeanimate_jax.load(tmp_path)
    x, _, ctx = _inputs(1, 13, 32)
    with torch.no_grad():
        ref = ref_model(x, 500, ctx).sample
    out = jax.jit(lambda a, c: ours(a, 500, c))(jnp.asarray(nchw_to_nhwc(x)),
                                                jnp.asarray(ctx.numpy()))
    assert_parity(out, nchw_to_nhwc(ref), "unet output, 13x13 latent")


def test_unet_parity_with_controlnet_residuals(tmp_path):
    ref_model = tiny.save_unet(tmp_path, **tiny.SD1_UNET)
    ours = freeanimate_jax.load(tmp_path)
    x, t, ctx = _inputs(2, 16, 32)
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 32, 16, 16)] * 3 + [(2, 32, 8, 8)] + [(2, 64, 8, 8)] * 2
    down = [torch.randn(s, generator=g) for s in shapes]
    mid = torch.randn(2, 64, 8, 8, generator=g)
    with torch.no_grad():
        ref = ref_model(x, t, ctx, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
    out = ours(jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
               down_block_additional_residuals=[jnp.asarray(nchw_to_nhwc(d)) for d in down],
               mid_block_additional_residual=jnp.asarray(nchw_to_nhwc(mid)))
    assert_parity(out, nchw_to_nhwc(ref), "unet output with residuals")


def test_wrong_transpose_is_caught(tmp_path):
    """The parity check fails if a square Linear weight is loaded untransposed."""
    ref_model = tiny.save_unet(tmp_path, **tiny.SD1_UNET)
    ours = freeanimate_jax.load(tmp_path)
    q = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert q.shape[0] == q.shape[1]  # square: a shape check alone cannot catch it
    q.set_value(q[...].T)
    x, t, ctx = _inputs(0, 16, 32)
    with torch.no_grad():
        ref = ref_model(x, t, ctx).sample
    out = ours(jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    with pytest.raises(AssertionError, match="max abs error"):
        assert_parity(out, nchw_to_nhwc(ref), "unet output")


def test_unsupported_config_fails_clearly():
    from freeanimate_jax.weights.loader import build

    cfg = dict(tiny.SD1_UNET, _class_name="UNet2DConditionModel", class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type"):
        build(cfg, abstract=True)


def test_unet_bf16_runs_close(tmp_path):
    tiny.save_unet(tmp_path, **tiny.SD1_UNET)
    f32 = freeanimate_jax.load(tmp_path)
    b16 = freeanimate_jax.load(tmp_path, dtype=jnp.bfloat16)
    x, t, ctx = _inputs(0, 16, 32)
    args = (jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    a = f32(jnp.asarray(nchw_to_nhwc(x)), *args)
    b = b16(jnp.asarray(nchw_to_nhwc(x), jnp.bfloat16), *args)
    assert b.dtype == jnp.bfloat16
    rel = float(jnp.max(jnp.abs(a - b.astype(jnp.float32)))) / float(jnp.max(jnp.abs(a)))
    assert np.isfinite(rel) and rel < 0.05
