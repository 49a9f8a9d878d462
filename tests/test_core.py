"""The sampling core: call-time settings that compile nothing, `latents=`, the ControlNet step
range as diffusers applies it, and the step-fraction rounding rule."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from freeanimate_jax.demo import TINY_CONFIGS, TINY_SIZE, tiny_models, tiny_tokenizer
from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate
from freeanimate_jax.pipelines.core import controlnet_scales, until_flags
from freeanimate_jax.pipelines.generate import Generate, GenerateSettings


class CompileCounter:
    """Counts XLA backend compilations (jax's own monitoring event) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._seen)

    def _seen(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == self.EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        self.active, self.count = True, 0
        return self

    def __exit__(self, *exc) -> None:
        self.active = False


@pytest.fixture(scope="module")
def compiles():
    return CompileCounter()


# -- ControlNet step range --------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_controlnet_pipeline():
    """A real tiny diffusers StableDiffusionControlNetPipeline (the demo family's configs)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    def cfg(name):
        return {k: v for k, v in TINY_CONFIGS[name].items() if not k.startswith("_")}

    torch.manual_seed(0)
    text = {k: v for k, v in TINY_CONFIGS["text_encoder"].items() if k != "architectures"}
    pipe = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL(**cfg("vae")), text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        tokenizer=tiny_tokenizer(), unet=UNet2DConditionModel(**cfg("unet")),
        controlnet=ControlNetModel(**cfg("controlnet")), scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_scales(pipe, steps: int, start: float, end: float, scale: float) -> np.ndarray:
    """The conditioning scale diffusers passes its ControlNet at each step of a real run."""
    import torch

    seen, forward = [], pipe.controlnet.forward

    def record(*args, **kwargs):
        seen.append(float(kwargs["conditioning_scale"]))
        return forward(*args, **kwargs)

    pipe.controlnet.forward = record
    try:
        with torch.no_grad():
            pipe("a person", image=torch.zeros(1, 3, TINY_SIZE, TINY_SIZE), height=TINY_SIZE,
                 width=TINY_SIZE, num_inference_steps=steps, guidance_scale=1.0,
                 controlnet_conditioning_scale=scale, control_guidance_start=start,
                 control_guidance_end=end, output_type="latent")
    finally:
        pipe.controlnet.forward = forward
    return np.asarray(seen, np.float32)


@pytest.mark.parametrize("steps, start, end", [(25, 0.0, 0.5), (4, 0.0, 0.6), (3, 0.25, 0.75),
                                               (10, 0.1, 0.95)])
def test_controlnet_step_range_equals_diffusers(diffusers_controlnet_pipeline, steps, start, end):
    expected = _diffusers_scales(diffusers_controlnet_pipeline, steps, start, end, 0.8)
    assert len(expected) == steps
    np.testing.assert_array_equal(controlnet_scales(steps, start, end, 0.8), expected)


def test_step_fractions_round_half_up_as_written():
    # 0.3 x 5 is 1.4999999999999998 in binary: as written it is 1.5, which rounds up.
    assert until_flags(5, 0.3).sum() == 2
    assert until_flags(5, 0.5).sum() == 3  # 2.5: half up, not to even
    assert until_flags(25, 0.8).sum() == 20 and until_flags(3, 0.67).sum() == 2
    assert until_flags(6, 0.0).sum() == 0 and until_flags(6, 1.0).all()
    np.testing.assert_array_equal(until_flags(4, 0.5), [True, True, False, False])


# -- call-time settings -----------------------------------------------------------------------
FRAMES = 3
FIRST = AnimateSettings(steps=3, preview_steps=2, guidance_scale=5.0, eta=0.3, seed=7,
                        iba_until=0.67, ra_sa_until=1.0, controlnet_scale=1.0)
# Every call-time setting moved (guidance stays above 1 and eta above 0: those two facts, not
# the values, fix the program).
CHANGED = dict(seed=3, negative_prompt="blurry", guidance_scale=3.0, controlnet_scale=0.7,
               controlnet_start=0.1, controlnet_end=0.9, eta=0.6, iba_until=0.34,
               ra_sa_until=0.5, preview_from_reference=0.6)


@pytest.fixture(scope="module")
def animate_inputs():
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), np.uint8),
            rng.integers(0, 256, (FRAMES, TINY_SIZE, TINY_SIZE, 3), np.uint8))


def test_a_second_call_with_other_settings_compiles_nothing(tiny, animate_inputs, compiles):
    pipe = FreeAnimate(tiny(), FIRST)
    first = pipe(*animate_inputs, "a dancer")
    with compiles:
        second = pipe(*animate_inputs, "a dancer in red", **CHANGED)
    assert compiles.count == 0
    assert np.abs(second.frames - first.frames).max() > 1e-3  # the settings did change it
    # ... exactly as a fresh pipeline built with those settings makes it, and that pipeline
    # (the same models) reuses the compiled stages too.
    with compiles:
        fresh = FreeAnimate(tiny(), dataclasses.replace(FIRST, **CHANGED))(
            *animate_inputs, "a dancer in red")
    assert compiles.count == 0
    np.testing.assert_array_equal(second.frames, fresh.frames)
    np.testing.assert_array_equal(second.preview, fresh.preview)
    # Models of the same architecture built separately (other weights) share them as well.
    other = tiny_models(seed=5)
    with compiles:
        FreeAnimate(other, FIRST)(*animate_inputs, "a dancer")
    assert compiles.count == 0


def test_latents_equal_to_the_pipelines_own_noise_give_identical_frames(tiny, animate_inputs):
    pipe = FreeAnimate(tiny(), FIRST)
    own = pipe.initial_latents(FRAMES, (TINY_SIZE, TINY_SIZE), seed=FIRST.seed)
    base = pipe(*animate_inputs, "a dancer")
    same = pipe(*animate_inputs, "a dancer", latents=own)
    np.testing.assert_array_equal(same.frames, base.frames)
    other = pipe(*animate_inputs, "a dancer", latents=np.asarray(own)[::-1])
    assert np.abs(other.frames - base.frames).max() > 1e-3
    with pytest.raises(ValueError, match="latents of shape"):
        pipe(*animate_inputs, "a dancer", latents=np.zeros((FRAMES, 4, 4, 4)))


def test_generate_second_call_compiles_nothing_and_latents(tiny_video, compiles):
    s = GenerateSettings(frames=4, steps=2, guidance_scale=6.0, eta=0.2, seed=1)
    pipe = Generate(tiny_video(), s)
    size = (TINY_SIZE, TINY_SIZE)
    first = pipe("a cat", size)
    changed = dict(seed=5, guidance_scale=2.5, eta=0.5, negative_prompt="dark")
    with compiles:
        second = pipe("a dog", size, **changed)
    assert compiles.count == 0 and np.abs(second.frames - first.frames).max() > 1e-3
    fresh = Generate(tiny_video(), dataclasses.replace(s, **changed))("a dog", size)
    np.testing.assert_array_equal(second.frames, fresh.frames)
    own = pipe.initial_latents(size, seed=5)
    np.testing.assert_array_equal(pipe("a dog", size, latents=own, **changed).frames,
                                  second.frames)


def test_call_time_settings_and_what_fixes_the_program():
    s = AnimateSettings()
    assert set(AnimateSettings.CALL_TIME) == {
        "guidance_scale", "negative_prompt", "eta", "seed", "controlnet_scale",
        "controlnet_start", "controlnet_end", "iba_until", "ra_sa_until",
        "preview_from_reference"}
    assert s.cfg and not dataclasses.replace(s, guidance_scale=1.0).cfg  # as diffusers
    assert s.preview_from_reference == 0.0  # each preview frame from its own noise, as before
    with pytest.raises(ValueError, match="preview_from_reference"):
        AnimateSettings(preview_from_reference=1.5)
    assert s.with_call(clip_skip=None, seed=4) == dataclasses.replace(s, seed=4)
    with pytest.raises(TypeError, match="unknown setting"):
        s.with_call(guidance=3.0)


def test_fit_lowers_exactly_the_arguments_the_run_passes(fresh_tiny):
    """Every stage of a sharded run (8 devices, frames padded) receives arguments with the
    shapes, dtypes and shardings fit lowers it with: pipeline `input_specs` placed by the
    pipeline's `placement`, later stages fed the declared placement of earlier outputs."""
    from freeanimate_jax import parallel

    mesh = parallel.make_mesh()
    s = AnimateSettings(steps=2, preview_steps=1)
    pipe = FreeAnimate(fresh_tiny(), s, mesh=mesh)
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), np.uint8)
    poses = rng.integers(0, 256, (FRAMES, TINY_SIZE, TINY_SIZE, 3), np.uint8)
    host = pipe.host_inputs(ref, poses, pipe.token_ids("a dancer", ""), s)
    run = {**pipe.weights(), **{k: pipe.place(v, axis) for k, (v, axis) in host.items()}}

    def place(tree, axis):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=pipe.placement(a.shape, axis)), tree)

    fit = {k: place(v, axis) for k, (v, axis) in
           pipe.input_specs(FRAMES, (TINY_SIZE, TINY_SIZE), s).items()}
    plan = pipe.plan(s)
    assert [st.name for st in plan][:4] == ["text encoder", "VAE encode", "reference inversion",
                                            "preview reference inversion"]
    for step in plan:
        ran, lowered = ([b[k] for k in step.inputs] for b in (run, fit))
        assert jax.tree.structure(ran) == jax.tree.structure(lowered), step.name
        for a, b in zip(jax.tree.leaves(ran), jax.tree.leaves(lowered), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), step.name
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (step.name, a.sharding,
                                                                      b.sharding)
        out = step.stage(*ran)
        low = step.stage.lower(*lowered)
        results = out if len(step.outputs) > 1 else (out,)
        infos = low.out_info if len(step.outputs) > 1 else (low.out_info,)
        for (key, axis), value, info in zip(step.outputs, results, infos, strict=True):
            run[key], fit[key] = value, place(info, axis)
