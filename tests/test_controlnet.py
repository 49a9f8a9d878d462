"""ControlNetModel parity with diffusers, and full-size parameter counts without downloads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import freeanimate_jax
from freeanimate_jax.models import known_configs
from freeanimate_jax.weights.loader import build
from tests import tiny
from tests.helpers import assert_parity, nchw_to_nhwc


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    cond = torch.rand(2, 3, 64, 64, generator=g)  # pixel space: 8x the latent
    return x, torch.tensor([3, 901]), ctx, cond


def _jax(*arrays):
    return [jnp.asarray(nchw_to_nhwc(a) if a.ndim == 4 else a.numpy()) for a in arrays]


@pytest.mark.parametrize("scale,guess_mode", [(1.0, False), (0.7, False), (0.8, True)])
def test_controlnet_residuals_parity(tmp_path, scale, guess_mode):
    ref_model = tiny.save_controlnet(tmp_path, **tiny.CONTROLNET)
    ours = freeanimate_jax.load(tmp_path)
    x, t, ctx, cond = _inputs(0)
    with torch.no_grad():
        ref_down, ref_mid = ref_model(x, t, ctx, cond, conditioning_scale=scale,
                                      guess_mode=guess_mode, return_dict=False)
    xj, tj, cj, condj = _jax(x, t, ctx, cond)
    down, mid = jax.jit(lambda *a: ours(*a, conditioning_scale=scale, guess_mode=guess_mode))(
        xj, tj, cj, condj)
    assert len(down) == len(ref_down) == 6  # conv_in + 3 + 2 skips
    for i, (a, b) in enumerate(zip(down, ref_down, strict=True)):
        assert_parity(a, nchw_to_nhwc(b), f"down residual {i}")
    assert_parity(mid, nchw_to_nhwc(ref_mid), "mid residual")


def test_controlnet_into_unet_parity(tmp_path):
    """The control branch end to end: ControlNet residuals feeding the UNet."""
    ref_cn = tiny.save_controlnet(tmp_path / "cn", **tiny.CONTROLNET)
    ref_unet = tiny.save_unet(tmp_path / "unet", **tiny.SD1_UNET)
    cn, unet = freeanimate_jax.load(tmp_path / "cn"), freeanimate_jax.load(tmp_path / "unet")
    x, t, ctx, cond = _inputs(1)
    with torch.no_grad():
        d, m = ref_cn(x, t, ctx, cond, return_dict=False)
        ref = ref_unet(x, t, ctx, down_block_additional_residuals=d,
                       mid_block_additional_residual=m).sample
    xj, tj, cj, condj = _jax(x, t, ctx, cond)
    down, mid = cn(xj, tj, cj, condj)
    out = unet(xj, tj, cj, down_block_additional_residuals=down,
               mid_block_additional_residual=mid)
    assert_parity(out, nchw_to_nhwc(ref), "unet(controlnet) output")


def _count(config) -> int:
    model = build(config, abstract=True)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_full_size_parameter_counts():
    # diffusers' published counts for runwayml SD1.5's UNet and lllyasviel's v1.1 openpose.
    assert _count(known_configs.SD15_UNET) == 859_520_964
    assert _count(known_configs.OPENPOSE_CONTROLNET) == 361_279_120
