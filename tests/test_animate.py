"""FreeAnimate pipeline equivalences on the tiny family: cache modes, switches, sharding."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from freeanimate_jax import parallel
from freeanimate_jax.demo import TINY_SIZE
from freeanimate_jax.models.attention import AttnControl, LayerInputs
from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate
from tests.helpers import np_anchored_attention

FRAMES = 3  # not a multiple of 8: the sharded run pads to 8 and drops the padding
# The preview starts from 0.5 x the inverted reference + 0.87 x each frame's noise: every
# equivalence below covers the blend.
BASE = AnimateSettings(steps=3, preview_steps=3, guidance_scale=5.0, iba_until=0.67, seed=7,
                       preview_from_reference=0.5)


@pytest.fixture(scope="module")
def models(tiny):
    return tiny()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (FRAMES, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    return reference, poses


@pytest.fixture(scope="module")
def baseline(models, inputs):
    return FreeAnimate(models, BASE)(*inputs, "a dancer").frames


def _run(models, inputs, mesh=None, **changes):
    return FreeAnimate(models, dataclasses.replace(BASE, **changes), mesh=mesh)(
        *inputs, "a dancer").frames


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_baseline_is_a_video(baseline):
    assert baseline.shape == (FRAMES, TINY_SIZE, TINY_SIZE, 3)
    assert np.isfinite(baseline).all() and 0.0 <= baseline.min() and baseline.max() <= 1.0
    assert _maxdiff(baseline[0], baseline[1]) > 1e-3  # different poses, different frames


@pytest.mark.parametrize("mode", ["maps", "recompute"])
def test_cache_modes_give_the_same_frames(models, inputs, baseline, mode):
    assert _maxdiff(_run(models, inputs, cache_mode=mode), baseline) <= 1e-5


@pytest.mark.parametrize("switch_off", [{"iba_layers": ()}, {"iba_until": 0.0},
                                        {"ra_sa_layers": ()}, {"ra_sa_until": 0.0}],
                         ids=["iba_layers", "iba_until", "ra_sa_layers", "ra_sa_until"])
def test_iba_and_ra_sa_are_not_no_ops(models, inputs, baseline, switch_off):
    assert _maxdiff(_run(models, inputs, **switch_off), baseline) > 1e-3


def test_preview_start_blends_the_inverted_reference_into_each_frames_noise():
    from freeanimate_jax.models.attention import Runtime
    from freeanimate_jax.pipelines.animate import preview_start
    from freeanimate_jax.pipelines.core import CallValues

    rng = np.random.default_rng(3)
    noise = rng.standard_normal((FRAMES, 4, 4, 4)).astype(np.float32)
    z_ref = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)

    def start(w):
        return np.asarray(preview_start(Runtime(), noise, z_ref, CallValues(start=np.float32(w))))

    np.testing.assert_array_equal(start(0.0), noise)  # the noise-start preview, bit for bit
    np.testing.assert_array_equal(start(1.0), np.repeat(z_ref, FRAMES, 0))
    # 0.6 z + 0.8 n: unit variance for independent unit-variance terms.
    np.testing.assert_allclose(start(0.6), 0.6 * z_ref + 0.8 * noise, rtol=1e-6, atol=1e-6)


def test_a_preview_from_the_reference_starts_every_frame_alike(models, inputs):
    """With the whole start the inverted reference, frames with one pose get one preview; from
    their own noise (0, the default) they differ."""
    reference, poses = inputs
    same_pose = np.repeat(poses[:1], FRAMES, axis=0)
    for w, alike in ((1.0, True), (0.0, False)):
        preview = FreeAnimate(models, dataclasses.replace(BASE, preview_from_reference=w))(
            reference, same_pose, "a dancer").preview
        spread = max(_maxdiff(preview[0], preview[i]) for i in range(1, FRAMES))
        assert (spread <= 1e-6) if alike else (spread > 1e-3), (w, spread)


def test_the_preview_starts_from_the_reference_inverted_over_the_preview_steps(models, inputs):
    """With preview_steps != steps the preview's own reference inversion gives the start: the
    same preview as passing that z_T as every frame's latents with no blend."""
    from freeanimate_jax.pipelines.core import execute

    reference, poses = inputs
    s = dataclasses.replace(BASE, steps=3, preview_steps=2, preview_from_reference=1.0)
    pipe = FreeAnimate(models, s)
    host = pipe.host_inputs(reference, poses, pipe.token_ids("a dancer", s.negative_prompt), s)
    buffers = {**pipe.weights(), **{k: pipe.place(v, a) for k, (v, a) in host.items()}}
    plan = pipe.plan(s)
    execute(plan[:[st.name for st in plan].index("preview start")], buffers, None, {})
    z_t = np.asarray(buffers["preview anchors z_T"])
    assert z_t.shape == (1, *pipe.latent_shape((TINY_SIZE, TINY_SIZE)))
    # Not the reference's latent itself, nor its inversion over the final denoise's 3 steps.
    assert _maxdiff(z_t, buffers["z_ref"]) > 1e-2
    assert _maxdiff(z_t, buffers["anchors z_T"]) > 1e-4
    ours = pipe(reference, poses, "a dancer").preview
    given = pipe(reference, poses, "a dancer", latents=np.repeat(z_t, FRAMES, axis=0),
                 preview_from_reference=0.0).preview
    np.testing.assert_array_equal(ours, given)


def test_one_device_and_eight_devices_give_the_same_frames(fresh_tiny, inputs, baseline):
    assert jax.device_count() == 8
    mesh = parallel.make_mesh()
    assert parallel.padded_frames(FRAMES, mesh) == 8
    assert _maxdiff(_run(fresh_tiny(), inputs, mesh=mesh), baseline) <= 1e-5


def test_padding_frames_never_changes_real_frames():
    mesh = parallel.make_mesh()
    x = np.arange(3 * 2).reshape(3, 2)
    padded = parallel.pad_frames(x, parallel.padded_frames(3, mesh))
    assert padded.shape == (8, 2)
    np.testing.assert_array_equal(padded[:3], x)
    np.testing.assert_array_equal(padded[3:], np.repeat(x[2:], 5, axis=0))


def test_ra_sa_inside_the_unet_equals_hand_computed_anchored_attention(models):
    """One decoder self-attention layer, inside a full UNet forward, anchored to a reference."""
    unet = models.unet
    path = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    layer = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert layer.path == path
    keys = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(keys[0], (2, 8, 8, 4))
    ctx = jax.random.normal(keys[1], (2, 77, 32))
    channels = layer.to_q.in_features
    anchor = jax.random.normal(keys[2], (1, 64, channels))
    ctrl = AttnControl(inputs={path: LayerInputs(anchor=anchor)}, capture_hidden=(path,),
                       capture_output=(path,))
    unet(z, 500, ctx, attn=ctrl)
    cap = ctrl.captured
    expected = np_anchored_attention(layer, cap[path]["hidden"], anchor, heads=layer.heads)
    np.testing.assert_allclose(np.asarray(cap[path]["output"]), expected, atol=1e-5, rtol=0)


def test_animate_with_a_motion_module(models, tiny_video, inputs):
    """FreeAnimate with AnimateDiff's motion modules inserted: frames become one video, and the
    temporal layers change the result."""
    video = tiny_video(controlnet=True)
    assert video.unet.has_motion and not models.unet.has_motion
    frames = FreeAnimate(video, BASE)(*inputs, "a dancer").frames
    assert frames.shape == (FRAMES, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(frames).all()
    baseline = FreeAnimate(models, BASE)(*inputs, "a dancer").frames
    assert _maxdiff(frames, baseline) > 1e-3


@pytest.mark.slow
def test_animate_with_motion_on_eight_devices_equals_one_device(tiny_video, fresh_tiny):
    """FreeAnimate with motion modules, frames sharded over 8 devices: the temporal attention's
    frames -> tokens reshard makes the same video as one device, through all-to-alls."""
    import re

    from freeanimate_jax.models.motion import MotionModule
    from tests.helpers import lower_plan

    rng = np.random.default_rng(3)
    reference = rng.integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (8, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    s = dataclasses.replace(BASE, steps=2, preview_steps=2)
    one = FreeAnimate(tiny_video(controlnet=True), s)(reference, poses, "a dancer").frames
    mesh = parallel.make_mesh()
    pipe = FreeAnimate(fresh_tiny(video=True), s, mesh=mesh)
    eight = pipe(reference, poses, "a dancer").frames
    assert _maxdiff(eight, one) <= 1e-5
    # The run's own denoise program: one reshard into and one out of every temporal attention
    # of both CFG branches, as all-to-alls; nothing is gathered onto every device.
    texts = lower_plan(pipe, pipe.plan(s), pipe.input_specs(8, (TINY_SIZE, TINY_SIZE), s),
                       only={"preview", "denoise"})
    modules = sum(isinstance(n, MotionModule) for _, n in nnx.iter_graph(pipe.models.unet))
    assert modules == 7
    for stage in ("preview", "denoise"):
        assert len(re.findall(r"all-to-all\(", texts[stage])) >= 2 * modules * 2, stage
        assert "all-gather(" not in texts[stage], stage


def test_named_noise_streams_are_independent_and_per_frame():
    from freeanimate_jax.pipelines.common import frame_noise

    a = frame_noise(0, 4, (2, 2, 4), stream="eta/preview", step=1)
    b = frame_noise(0, 4, (2, 2, 4), stream="eta/denoise", step=1)
    assert _maxdiff(a, b) > 0.1  # streams sharing a prefix must still differ
    # Frame i's noise does not depend on how many frames are drawn (1 vs 8 devices, padding).
    np.testing.assert_array_equal(np.asarray(frame_noise(0, 8, (2, 2, 4))[:4]),
                                  np.asarray(frame_noise(0, 4, (2, 2, 4))))


def test_a_mesh_puts_every_weight_on_every_device_once(fresh_tiny):
    # Placed at construction, in place: jit then finds the weights where it wants them instead
    # of copying them from the first device at each stage (which would hold them twice).
    fresh = fresh_tiny()
    mesh = parallel.make_mesh()
    FreeAnimate(fresh, AnimateSettings(steps=2), mesh=mesh)
    target = parallel.replicated(mesh)
    parts = (fresh.unet, fresh.controlnet, fresh.vae, fresh.text_encoder)
    leaves = [x for m in parts for x in jax.tree.leaves(nnx.state(m))]
    assert leaves and all(len(x.devices()) == 8 for x in leaves)
    assert all(x.sharding.is_equivalent_to(target, x.ndim) for x in leaves)
    FreeAnimate(fresh, AnimateSettings(steps=2), mesh=mesh)  # already placed: left alone
    again = [x for m in parts for x in jax.tree.leaves(nnx.state(m))]
    assert all(a is b for a, b in zip(leaves, again, strict=True))
