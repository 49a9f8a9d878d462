"""The diffusers-shaped pipeline objects: `AnimateDiffPipeline` equals diffusers'
AnimateDiffPipeline on the same tiny weights (saved with diffusers' `save_pretrained`, loaded
by `from_pretrained`), with the same latents, DDIM; both objects give the frames of the classes
they wrap; a scheduler swaps in as in diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import freeanimate_jax as fa
from freeanimate_jax.demo import TINY_SIZE
from freeanimate_jax.pose import demo_keypoints, demo_reference, render_sequence
from tests import tiny
from tests.helpers import assert_parity

FRAMES = 8


@pytest.fixture(scope="module")
def diffusers_folders(tmp_path_factory):
    import diffusers

    tmp = tmp_path_factory.mktemp("animatediff")
    tiny.save_sd_pipeline(tmp, tmp / "sd")
    adapter = tiny.randomize(diffusers.MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
        motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True), 5,
        std=0.05)
    adapter.save_pretrained(tmp / "adapter")
    return tmp / "sd", tmp / "adapter"


def test_animatediff_pipeline_equals_diffusers(diffusers_folders):
    import diffusers

    sd, adapter = diffusers_folders
    ours = fa.AnimateDiffPipeline.from_pretrained(str(sd), motion_adapter=str(adapter))
    ref = diffusers.AnimateDiffPipeline.from_pretrained(
        sd, motion_adapter=diffusers.MotionAdapter.from_pretrained(adapter))
    ref.set_progress_bar_config(disable=True)
    size = 32  # the tiny VAE halves: 16x16 latents
    latents = np.random.default_rng(0).standard_normal((1, 4, FRAMES, 16, 16)).astype(np.float32)
    kw = dict(num_frames=FRAMES, height=size, width=size, num_inference_steps=3,
              guidance_scale=6.0, output_type="np")
    seen = {"ref": [], "ours": []}

    def record(who):
        def callback(pipe, step, t, kwargs):
            seen[who].append((step, int(t), np.asarray(kwargs["latents"], np.float32)))
            return kwargs
        return callback

    with torch.no_grad():
        want = ref("lower newer", latents=torch.from_numpy(latents),
                   callback_on_step_end=record("ref"), **kw).frames[0]
    got = ours("lower newer", latents=latents, callback_on_step_end=record("ours"),
               **kw).frames[0]
    assert got.shape == want.shape == (FRAMES, size, size, 3)
    assert_parity(got, want, "AnimateDiffPipeline frames")
    # callback_on_step_end: the same steps, timesteps and latents after each step.
    assert [s[:2] for s in seen["ours"]] == [s[:2] for s in seen["ref"]]
    assert len(seen["ours"]) == 3
    for (step, _, z), (_, _, z_ref) in zip(seen["ours"], seen["ref"], strict=True):
        assert_parity(z, z_ref, f"latents after step {step}")
    assert np.abs(want - want.mean(0)).max() > 1e-3  # frames differ: the motion module acts


@pytest.fixture(scope="module")
def demo_pipe():
    return fa.AnimateDiffPipeline.from_pretrained("builtin:tiny", motion_adapter="builtin:tiny")


def test_animatediff_pipeline_gives_generates_frames_and_swaps_schedulers(demo_pipe):
    size = (TINY_SIZE, TINY_SIZE)
    settings = fa.GenerateSettings(frames=FRAMES, steps=2, guidance_scale=5.0, seed=3)
    direct = fa.Generate(demo_pipe.models, settings)("a cat", size).frames
    out = demo_pipe("a cat", num_frames=FRAMES, height=TINY_SIZE, width=TINY_SIZE,
                    num_inference_steps=2, guidance_scale=5.0, generator=3)
    np.testing.assert_array_equal(out.frames[0], direct)
    # diffusers' way of choosing a sampler, and its Karras switch.
    demo_pipe.scheduler = fa.DPMSolverMultistepScheduler.from_config(
        demo_pipe.scheduler.config, use_karras_sigmas=True)
    steps = []
    out = demo_pipe("a cat", num_frames=FRAMES, height=TINY_SIZE, width=TINY_SIZE,
                    num_inference_steps=2, guidance_scale=5.0, seed=3, output_type="pil",
                    num_videos_per_prompt=2, return_latents=True,
                    callback_on_step_end=lambda p, i, t, kw: steps.append((i, kw["latents"])))
    # Through the multistep sampler's scan too: 2 steps per video, the last one the result.
    assert [i for i, _ in steps] == [0, 1, 0, 1]
    np.testing.assert_array_equal(steps[1][1][0].transpose(1, 0, 2, 3), out.latents[0])
    kdpm = fa.Generate(demo_pipe.models, settings)("a cat", size,
                                                   scheduler="dpmpp_2m_karras").frames
    assert len(out.frames) == 2 and len(out.frames[0]) == FRAMES
    first = np.stack([np.asarray(im, np.float32) / 255 for im in out.frames[0]])
    np.testing.assert_allclose(first, kdpm, atol=0.5 / 255 + 1e-6)
    assert out.latents[0].shape == (FRAMES, 4, TINY_SIZE // 8, TINY_SIZE // 8)
    assert np.abs(out.latents[0] - out.latents[1]).max() > 1e-3  # seeds 3 and 4
    demo_pipe.scheduler = fa.DDIMScheduler.from_config(demo_pipe.scheduler.config)
    with pytest.raises(ValueError, match="output_type='mp4'"):
        demo_pipe("a cat", output_type="mp4")


def test_freeanimate_pipeline_gives_freeanimates_frames():
    pipe = fa.FreeAnimatePipeline.from_pretrained("builtin:tiny", controlnet="builtin:tiny")
    size = (TINY_SIZE, TINY_SIZE)
    ref = demo_reference(size)
    poses = render_sequence(demo_keypoints(FRAMES, size), size)
    settings = fa.AnimateSettings(steps=2, preview_steps=2, guidance_scale=4.0, seed=1)
    direct = fa.FreeAnimate(pipe.models, settings)(ref, poses, "a person").frames
    out = pipe(ref, poses, "a person", num_inference_steps=2, preview_steps=2,
               guidance_scale=4.0, generator=1)
    np.testing.assert_array_equal(out.frames[0], direct)
    pipe.scheduler = fa.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="FreeAnimate samples with DDIM"):
        pipe(ref, poses, "a person", num_inference_steps=2, preview_steps=2)


def test_prompt_embeds_stand_for_the_prompt(demo_pipe):
    """diffusers' `prompt_embeds`: the embedding of "a dog" with the prompt "a cat" gives the
    frames of the prompt "a dog"."""
    import jax.numpy as jnp

    from freeanimate_jax.models.clip_text import tokenize

    ids = tokenize(demo_pipe.models.tokenizer, ["a dog"])
    embeds = np.asarray(demo_pipe.models.text_encoder(jnp.asarray(ids)))
    kw = dict(num_frames=FRAMES, height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=2,
              guidance_scale=5.0, generator=1)
    dog = demo_pipe("a dog", **kw).frames[0]
    given = demo_pipe("a cat", prompt_embeds=embeds, **kw).frames[0]
    cat = demo_pipe("a cat", **kw).frames[0]
    # The embedding computed eagerly here, the prompt's inside the compiled text stage: float
    # rounding apart (measured 1.3e-6), not a different text.
    np.testing.assert_allclose(given, dog, atol=1e-5)
    assert np.abs(cat - dog).max() > 1e-3
    with pytest.raises(ValueError, match=r"prompt_embeds of shape \(1, 5\); expected"):
        demo_pipe("a cat", prompt_embeds=np.zeros((1, 5)), **kw)


def test_step_callbacks_on_a_mesh_see_the_whole_latents_in_order(demo_pipe):
    """On 8 devices (frames sharded) the callback gets every step, in order, with the whole
    video's latents: those of the one-device run."""
    import jax

    from freeanimate_jax import parallel

    assert len(jax.devices()) == 8
    sharded = fa.AnimateDiffPipeline.from_pretrained(
        "builtin:tiny", motion_adapter="builtin:tiny", mesh=parallel.make_mesh())
    kw = dict(num_frames=FRAMES, height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=3,
              guidance_scale=5.0, seed=1)
    seen = {"one": [], "eight": []}
    for name, pipe in (("one", demo_pipe), ("eight", sharded)):
        pipe("a cat", callback_on_step_end=lambda p, i, t, k, name=name: seen[name].append(
            (i, t, k["latents"])), **kw)
    assert [(i, t) for i, t, _ in seen["eight"]] == [(i, t) for i, t, _ in seen["one"]]
    assert [i for i, _, _ in seen["eight"]] == [0, 1, 2]
    for (_, _, z8), (_, _, z1) in zip(seen["eight"], seen["one"], strict=True):
        assert z8.shape == (1, 4, FRAMES, TINY_SIZE // 8, TINY_SIZE // 8)
        assert_parity(z8, z1, "latents on 8 devices")  # summation order only
