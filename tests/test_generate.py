"""Text-to-video: context windows, FreeNoise noise reuse, and the sampling pipeline."""

import dataclasses

import numpy as np
import pytest

from freeanimate_jax.demo import TINY_SIZE
from freeanimate_jax.pipelines.context import freenoise_order, make_windows
from freeanimate_jax.pipelines.generate import Generate, GenerateSettings


def test_windows_cover_every_frame_and_weights_sum_to_one():
    w = make_windows(40, 16, 4)
    assert w.index.shape == (7, 16)  # starts 0, 4, ..., 24: the last ends at frame 39
    assert w.index[-1, -1] == 39 and w.index[0, 0] == 0
    total = np.zeros(40)
    np.add.at(total, w.index, w.weight)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert set(w.index.ravel()) == set(range(40))
    # A start that the stride misses is pulled back so the last window still ends at the end.
    w = make_windows(42, 16, 4)
    assert w.index[-1, -1] == 41 and w.index[-1, 0] == 26


def test_one_window_is_the_plain_path():
    w = make_windows(12, 16, 4)
    assert w.count == 1 and (w.weight == 1).all()
    np.testing.assert_array_equal(freenoise_order(12, 16, 4, 0), np.arange(12))


def test_freenoise_reuses_shuffled_noise_within_stride_groups():
    order = freenoise_order(40, 16, 4, seed=3)
    np.testing.assert_array_equal(order[:16], np.arange(16))
    for block in (order[16:32], order[32:40]):
        for g in range(0, len(block), 4):
            group = block[g:g + 4]
            assert sorted(group) == list(range(g, g + len(group)))
    assert not np.array_equal(order[16:32], np.arange(16))


@pytest.fixture(scope="module")
def video_models(tiny_video):
    return tiny_video()


BASE = GenerateSettings(frames=8, steps=2, guidance_scale=6.0, seed=1)


def _gen(models, **changes):
    s = dataclasses.replace(BASE, **changes)
    return Generate(models, s)("a cat", (TINY_SIZE, TINY_SIZE)).frames


def test_windows_wider_than_the_video_equal_the_plain_path(video_models):
    plain = _gen(video_models)
    windowed = _gen(video_models, context_length=16)
    assert plain.shape == (8, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(plain).all()
    np.testing.assert_array_equal(windowed, plain)


def test_long_video_needs_windows_and_works_with_them(video_models):
    with pytest.raises(ValueError, match="exceed the motion module's position table"):
        _gen(video_models, frames=40, steps=1)
    long = _gen(video_models, frames=40, steps=1, context_length=16, window_batch=4)
    assert long.shape == (40, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(long).all()


def test_sharded_frames_with_controlnet_equal_one_device(fresh_tiny):
    # 8 frames over 8 virtual devices, a per-frame ControlNet on random control images: the
    # temporal attention's frames->tokens resharding must leave the video unchanged.
    import jax

    from freeanimate_jax import parallel

    models = fresh_tiny(video=True)
    poses = np.random.default_rng(0).integers(0, 256, (8, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    s = dataclasses.replace(BASE, eta=0.5)  # eta noise: per-frame streams under sharding too
    one = Generate(models, s)("a cat", (TINY_SIZE, TINY_SIZE), poses).frames
    assert len(jax.devices()) == 8
    mesh = parallel.make_mesh()
    eight = Generate(models, s, mesh=mesh)("a cat", (TINY_SIZE, TINY_SIZE), poses).frames
    no_control = Generate(models, s)("a cat", (TINY_SIZE, TINY_SIZE)).frames
    assert np.abs(one - no_control).max() > 1e-3  # the control images do steer the video
    np.testing.assert_allclose(eight, one, atol=1e-5)


def test_every_scheduler_generates_end_to_end(video_models):
    """Each sampler runs through the compiled denoise scan (scaled input, float timesteps,
    DPM++'s carried x0, per-step noise); step parity with diffusers is tests/test_samplers.py."""
    out = {k: _gen(video_models, scheduler=k, steps=3)
           for k in ("ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "lcm")}
    for k, frames in out.items():
        assert frames.shape == (8, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(frames).all(), k
    keys = list(out)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.abs(out[a] - out[b]).max() > 1e-3, (a, b)
    # The ancestral sampler draws fresh noise every step, from the seed: with the same starting
    # latents another seed changes the video, the same seed repeats it.
    s = dataclasses.replace(BASE, scheduler="EulerAncestralDiscreteScheduler", steps=3)
    pipe = Generate(video_models, s)
    z = pipe.initial_latents((TINY_SIZE, TINY_SIZE))
    same = pipe("a cat", (TINY_SIZE, TINY_SIZE), latents=z).frames
    np.testing.assert_array_equal(same, out["euler_ancestral"])
    other = pipe("a cat", (TINY_SIZE, TINY_SIZE), latents=z, seed=2).frames
    assert np.abs(other - same).max() > 1e-3


def test_animate_keeps_ddim_and_says_so():
    from freeanimate_jax.pipelines.settings import AnimateSettings

    with pytest.raises(ValueError, match="scheduler=euler: FreeAnimate samples with DDIM"):
        AnimateSettings(scheduler="euler")
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's; scheduler=lcm takes none"):
        GenerateSettings(scheduler="lcm", eta=0.5)
