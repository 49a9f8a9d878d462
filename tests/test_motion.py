"""Motion modules: parity with diffusers' UNetMotionModel, switches, and sharded frames."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import freeanimate_jax
from freeanimate_jax import parallel
from freeanimate_jax.models.motion import UNetMotionModel
from tests import tiny
from tests.helpers import assert_parity

FRAMES = 5


def _video_inputs(seed: int, batch: int = 1, frames: int = FRAMES):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 8, 8, generator=g)  # diffusers: (B, C, F, H, W)
    ctx = torch.randn(batch, 7, 32, generator=g)
    return x, ctx


def _ours(x):
    return jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())  # -> (B, F, H, W, C)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import UNetMotionModel as TorchMotion

    root = tmp_path_factory.mktemp("motion")
    unet2d = tiny.save_unet(root / "unet", **tiny.SD1_UNET)
    adapter = tiny.save_motion_adapter(root / "adapter", **tiny.MOTION_ADAPTER)
    ref = TorchMotion.from_unet2d(unet2d, adapter).eval()
    ours = UNetMotionModel.from_unet2d(freeanimate_jax.load(root / "unet"),
                                       freeanimate_jax.load(root / "adapter"))
    return ref, ours, root


def test_motion_unet_parity_with_diffusers(pair):
    ref, ours, _ = pair
    x, ctx = _video_inputs(0, batch=2)
    with torch.no_grad():
        # diffusers 0.42 takes text already repeated per frame (its pipeline repeats it).
        expected = ref(x, 321, ctx.repeat_interleave(FRAMES, 0)).sample
    out = ours(_ours(x), 321, jnp.asarray(ctx.numpy()))
    assert out.shape == (2, FRAMES, 8, 8, 4)
    assert_parity(out, expected.permute(0, 2, 3, 4, 1).numpy(), "motion unet")


def test_motion_unet_parity_with_controlnet_residuals(pair):
    ref, ours, _ = pair
    x, ctx = _video_inputs(1)
    g = torch.Generator().manual_seed(5)
    shapes = [(FRAMES, 32, 8, 8)] * 3 + [(FRAMES, 32, 4, 4)] + [(FRAMES, 64, 4, 4)] * 2
    down = [torch.randn(s, generator=g) for s in shapes]
    mid = torch.randn(FRAMES, 64, 4, 4, generator=g)
    with torch.no_grad():
        expected = ref(x, 40, ctx.repeat_interleave(FRAMES, 0),
                       down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    nhwc = [jnp.asarray(d.permute(0, 2, 3, 1).numpy()) for d in down]
    out = ours(_ours(x), 40, jnp.asarray(ctx.numpy()), down_block_additional_residuals=nhwc,
               mid_block_additional_residual=jnp.asarray(mid.permute(0, 2, 3, 1).numpy()))
    assert_parity(out, expected.permute(0, 2, 3, 4, 1).numpy(), "motion unet + controlnet")


def test_motion_modules_are_not_a_no_op_and_norm_switch_matters(pair):
    _, ours, _ = pair
    x, ctx = _video_inputs(2)
    base = ours(_ours(x), 321, jnp.asarray(ctx.numpy()))
    per_frame = [m for m in jax.tree.leaves(
        ours, is_leaf=lambda n: hasattr(n, "norm_per_frame")) if hasattr(m, "norm_per_frame")]
    assert len(per_frame) == 2 * 2 + 1 + 2 * 3  # down, mid, up
    for m in per_frame:
        m.norm_per_frame = True
    try:
        switched = ours(_ours(x), 321, jnp.asarray(ctx.numpy()))
    finally:
        for m in per_frame:
            m.norm_per_frame = False
    assert float(jnp.max(jnp.abs(switched - base))) > 1e-3


def test_too_many_frames_for_the_position_table_fails_clearly(pair):
    _, ours, _ = pair
    x, ctx = _video_inputs(3, frames=25)  # the tiny adapter's table holds 24 positions
    with pytest.raises(ValueError, match="25 frames exceed the motion module's position table"):
        ours(_ours(x), 1, jnp.asarray(ctx.numpy()))


def test_one_device_and_eight_devices_give_the_same_output(pair):
    _, ours, _ = pair
    x, ctx = _video_inputs(4, frames=8)
    xj, cj = _ours(x), jnp.asarray(ctx.numpy())
    single = ours(xj, 77, cj)
    mesh = parallel.make_mesh()
    from flax import nnx

    from freeanimate_jax.models.attention import AttnControl

    graphdef, state = nnx.split(ours)
    runtime = parallel.runtime(mesh)  # the mesh's layout: the motion modules' sharding rules

    def f(state, x, c):
        return nnx.merge(graphdef, state)(x, 77, c, attn=AttnControl(runtime=runtime))

    with parallel.use(mesh):
        xs = jax.device_put(xj, parallel.frame_sharding(mesh, 5, axis=1))
        lowered = jax.jit(f).lower(parallel.replicate(state, mesh), xs,
                                   parallel.replicate(cj, mesh))
        sharded = lowered.compile()(parallel.replicate(state, mesh), xs,
                                    parallel.replicate(cj, mesh))
    assert "all-to-all" in lowered.compile().as_text()  # the frames -> tokens reshard
    assert_parity(sharded, single, "8-device motion unet", tol=1e-5)
    assert np.asarray(sharded).shape == (1, 8, 8, 8, 4)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_released_layouts_have_diffusers_parameter_counts(version):
    # The full-size configs `fit generate` builds abstractly: every parameter diffusers'
    # MotionAdapter has (built on the meta device, no memory).
    from diffusers import MotionAdapter
    from flax import nnx

    from freeanimate_jax.models.known_configs import SD15_MOTION_ADAPTERS
    from freeanimate_jax.weights.loader import build

    config = SD15_MOTION_ADAPTERS[version]
    with torch.device("meta"):
        ref = MotionAdapter.from_config(config)
    ours = build(config, abstract=True)
    # Same names; the same shapes up to the (in, out) transpose of linear weights.
    ref_shapes = {n: sorted(p.shape) for n, p in ref.named_parameters()}
    our_shapes = {".".join(map(str, path)): sorted(v.shape)
                  for path, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert our_shapes == ref_shapes
    positions = {tuple(b.shape) for n, b in ref.named_buffers() if n.endswith("pe")}
    assert positions == {(1, 24 if version == "v1" else 32, c) for c in (320, 640, 1280)}
