"""AnimateDiff text-to-video: prompt + a personalised SD 1.5 with motion modules -> video.

One compiled `lax.scan` over the sampler's steps (DDIM, or a `diffusion/samplers.py` kind) with
classifier-free guidance, an optional per-frame ControlNet (with diffusers' step range), and
sliding context windows for videos longer than the motion module's position table. Frames shard
over the mesh like the animate pipeline's; both run through the sampling core (`core.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax import parallel
from freeanimate_jax.diffusion import ddim, samplers
from freeanimate_jax.models.attention import AttnControl, Runtime
from freeanimate_jax.pipelines.common import frame_noise
from freeanimate_jax.pipelines.context import blend, freenoise_order, make_windows
from freeanimate_jax.pipelines.core import (
    TOKENS,
    CallValues,
    Sampler,
    Step,
    abstract,
    call_values,
    compiled,
    denoise_step,
    execute,
    guide,
    predict,
    report_step,
    report_step_end,
)
from freeanimate_jax.pipelines.settings import GenerateSettings

Array = jax.Array
__all__ = ["Generate", "GenerateResult", "GenerateSettings"]


@dataclasses.dataclass
class GenerateResult:
    frames: np.ndarray  # (F, H, W, 3) float in [0, 1]
    timings: dict[str, float]
    latents: np.ndarray | None = None  # the final latents (F, H/8, W/8, C), before decoding


@dataclasses.dataclass(frozen=True)
class VideoDenoise:
    unet: Any
    controlnet: Any  # None: no ControlNet (or no control images)
    runtime: Runtime
    scheduler: ddim.SchedulerConfig
    sampler: str  # settings.scheduler: ddim, or a `samplers.py` kind
    steps: int
    frames: int
    context_length: int | None
    context_stride: int
    window_batch: int
    cfg: bool
    eta_noise: bool
    display: bool
    step_end: bool = False  # each step's latents go to the host (callback_on_step_end)


@compiled
def video_denoise(p: VideoDenoise, unet_state, cn_state, z: Array, ctx_c: Array, ctx_u: Array,
                  poses: Array | None, call: CallValues) -> Array:
    unet = nnx.merge(p.unet, unet_state)
    cn = nnx.merge(p.controlnet, cn_state) if p.controlnet is not None else None
    tables, rt = ddim.make_tables(p.scheduler, p.steps), p.runtime
    win = make_windows(p.frames, p.context_length, p.context_stride)

    def video_eps(z: Array, t: Array, ctx: Array, cn_scale: Array) -> Array:
        """Noise prediction for all frames (F, h, w, c), window by window, blended."""
        def one(index: Array) -> Array:
            control = poses[index] if poses is not None else None
            return predict(unet, cn, z[index], t, ctx, control, cn_scale,
                           AttnControl(runtime=rt), video=True)

        if win.count == 1:
            return one(jnp.asarray(win.index[0]))
        per_window = jax.lax.map(one, jnp.asarray(win.index), batch_size=p.window_batch)
        return blend(per_window, win, z.shape[0])

    def guided(z: Array, t: Array, i: Array, cn_scale: Array) -> Array:
        eps = video_eps(z, t, ctx_c, cn_scale)
        if p.cfg:
            eps = guide(eps, video_eps(z, t, ctx_u, cn_scale), call.guidance)
        if p.display:
            report_step("denoise", i)
        return eps

    steps = (jnp.arange(p.steps), call.controlnet)
    if p.sampler == "ddim":
        def body(z, x):
            t, i, cn_scale = x
            eps = guided(z, t, i, cn_scale)
            z = denoise_step(tables, eps, t, z, i, eta_noise=p.eta_noise, call=call,
                             stream="eta/generate", runtime=rt)
            if p.step_end:
                report_step_end("denoise", i, t, z)
            return z, None

        ts = jnp.asarray(ddim.timesteps(p.scheduler, p.steps))
        z0, _ = jax.lax.scan(body, z, (ts, *steps))
        return z0

    sched = samplers.make_schedule(p.sampler, p.scheduler, p.steps)

    def sampler_body(carry, x):
        z, x0_prev = carry
        i, cn_scale = x
        out = guided(samplers.scale_input(sched, i, z), sched.model_t[i], i, cn_scale)
        noise = None
        if p.sampler in samplers.NOISY:  # per frame, from (seed, step): any device count
            noise = rt.constrain(frame_noise(call.seed, z.shape[0], z.shape[1:], z.dtype,
                                             "sampler/generate", i),
                                 ("frames",) + (None,) * (z.ndim - 1))
        z, x0_prev = samplers.step(sched, i, out, z, x0_prev, noise)
        if p.step_end:
            report_step_end("denoise", i, sched.model_t[i], z)
        return (z, x0_prev), None

    (z0, _), _ = jax.lax.scan(sampler_body, (z, jnp.zeros_like(z)), steps)
    return z0


class Generate(Sampler):
    """Text-to-video sampling over one set of models (`models.unet` a UNetMotionModel;
    `models.controlnet` optional). `settings` are the defaults of every call; a call may change
    any of them (see `pipelines/settings.py` for which ones compile)."""

    def __init__(self, models, settings: GenerateSettings | None = None, *, mesh=None,
                 progress=None, runtime: Runtime | None = None):
        settings = settings or GenerateSettings()
        # Padding frames would change what temporal attention sees: require a fit.
        parallel.check_frames(settings.frames, mesh, "generate")
        super().__init__(models, settings, mesh=mesh, progress=progress, runtime=runtime)

    def windows(self, s: GenerateSettings | None = None):
        s = s or self.settings
        return make_windows(s.frames, s.context_length, s.context_stride)

    def plan(self, s: GenerateSettings, controlled: bool, step_end: bool = False
             ) -> list[Step]:
        """The stages of one call; `controlled`: control images go to the ControlNet;
        `step_end`: the denoising scan reports each step's latents."""
        cn = self.graph("controlnet") if controlled else None
        program = VideoDenoise(self.graph("unet"), cn, self.runtime, self.models.scheduler,
                               s.scheduler, s.steps, s.frames, s.context_length, s.context_stride,
                               s.window_batch, s.cfg, s.eta > 0, self.display, step_end)
        return [self.text_step(s),
                Step(self.stage("denoise", video_denoise, program, s.steps),
                     ("unet", "controlnet" if controlled else "no model", "noise", "ctx_c",
                      "ctx_u", "poses", "denoise call"), (("z0", 0),)),
                self.decode_step(s, "z0")]

    def latent_shape(self, size_hw: tuple[int, int]) -> tuple[int, int, int]:
        scale = getattr(self.models.vae, "downscale", 8)
        if size_hw[0] % scale or size_hw[1] % scale:
            raise ValueError(f"size {size_hw} is not a multiple of the VAE's {scale}")
        return (size_hw[0] // scale, size_hw[1] // scale, self.models.unet.cfg.in_channels)

    def initial_latents(self, size_hw: tuple[int, int], seed: int | None = None,
                        settings: GenerateSettings | None = None) -> Array:
        """The starting noise a call with `seed` draws (FreeNoise-reordered for windows): pass
        it, or your own, as `latents=`."""
        s = settings or self.settings
        seed = s.seed if seed is None else seed
        base = frame_noise(seed, s.frames, self.latent_shape(size_hw), self.dtype)
        order = freenoise_order(s.frames, s.context_length, s.context_stride, seed)
        return base[jnp.asarray(order)]

    def host_inputs(self, ids: np.ndarray, size_hw: tuple[int, int], s: GenerateSettings,
                    poses: np.ndarray | None, latents: Array | np.ndarray | None = None
                    ) -> dict[str, tuple[Any, int | None]]:
        """The plan's input buffers as (value, frame axis or None), before placement."""
        if poses is not None and len(poses) != s.frames:
            raise ValueError(f"{len(poses)} control frames for a {s.frames}-frame video")
        if latents is None:
            z = self.initial_latents(size_hw, settings=s)
        else:
            want = (s.frames, *self.latent_shape(size_hw))
            if tuple(np.shape(latents)) != want:
                raise ValueError(f"latents of shape {tuple(np.shape(latents))}; expected {want} "
                                 f"(frames, latent height, latent width, channels)")
            z = jnp.asarray(latents, self.dtype)
        if s.scheduler != "ddim":  # diffusers' prepare_latents: noise x init_noise_sigma
            sigma = samplers.make_schedule(s.scheduler, self.models.scheduler, s.steps)
            z = z * jnp.asarray(sigma.init_noise_sigma, z.dtype)
        pose_in = None if poses is None else jnp.asarray(poses, self.dtype) / 255.0
        return {"ids": (ids, None), "noise": (z, 0), "poses": (pose_in, 0),
                "denoise call": (call_values(s, s.steps), None)}

    def input_specs(self, size_hw: tuple[int, int], s: GenerateSettings, controlled: bool
                    ) -> dict[str, tuple[Any, int | None]]:
        """Shapes, dtypes and placement of every buffer of the plan (what `fit` lowers), from
        `host_inputs` itself."""
        poses = np.zeros((s.frames, *size_hw, 3), np.uint8) if controlled else None
        host = self.host_inputs(np.zeros((2, TOKENS), np.int32), size_hw, s, poses)
        weights = {k: (v, None) for k, v in self.weights().items()}
        return {k: (abstract(v), axis) for k, (v, axis) in {**weights, **host}.items()}

    def __call__(self, prompt: str, size_hw: tuple[int, int], poses: np.ndarray | None = None,
                 *, latents: Array | np.ndarray | None = None,
                 prompt_embeds: Array | np.ndarray | None = None,
                 negative_prompt_embeds: Array | np.ndarray | None = None,
                 step_end: Callable[[int, Any, np.ndarray], None] | None = None,
                 **settings: Any) -> GenerateResult:
        """`poses` (F, H, W, 3) uint8 at `size_hw` when a ControlNet is loaded; `latents`: the
        starting noise (F, H/8, W/8, 4), default `initial_latents`; `prompt_embeds` /
        `negative_prompt_embeds`: (1, 77, D) text embeddings used instead of encoding `prompt`
        / `negative_prompt` (as diffusers'); `step_end(step, t, latents)`: called after each
        denoising step with its new latents (F, h, w, C) on the host (a program of its own);
        `settings`: any `GenerateSettings` field, for this call only."""
        s = self.settings.with_call(**settings)
        parallel.check_frames(s.frames, self.mesh, "generate")
        if poses is not None and len(poses) != s.frames:
            raise ValueError(f"{len(poses)} control frames for a {s.frames}-frame video")
        controlled = poses is not None and "controlnet" in self.pure
        timings: dict[str, float] = {}
        host = self.host_inputs(self.token_ids(prompt, s.negative_prompt), size_hw, s,
                                poses if controlled else None, latents)
        buffers = {**self.weights(), **{k: self.place(v, axis) for k, (v, axis) in host.items()}}
        plan = self.plan(s, controlled, step_end is not None)
        execute(plan[:1], buffers, self.progress, timings)  # the text encoder
        for name, arg, given in (("ctx_c", "prompt_embeds", prompt_embeds),
                                 ("ctx_u", "negative_prompt_embeds", negative_prompt_embeds)):
            if given is not None:
                want = tuple(buffers[name].shape)
                if tuple(np.shape(given)) != want:
                    raise ValueError(f"{arg} of shape {tuple(np.shape(given))}; expected {want}")
                buffers[name] = self.place(jnp.asarray(given, buffers[name].dtype), None)
        execute(plan[1:], buffers, self.progress, timings,
                step_end=None if step_end is None else lambda _, i, t, z: step_end(i, t, z))
        timings["total"] = sum(timings.values())
        return GenerateResult(self.to_host(buffers["frames"]), timings,
                              self.to_host(buffers["z0"]))

