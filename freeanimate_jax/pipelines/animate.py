"""FreeAnimate: reference image + poses (+ prompt) -> video, training-free.

Stages (DESIGN.md): reference DDIM inversion (capturing the RA-SA anchors per step), preview
generation (ControlNet + RA-SA + CFG, from per-frame noise blended with the inverted reference
by `preview_from_reference`), preview DDIM inversion (capturing the IBA cache), final
denoising (ControlNet + RA-SA + IBA + CFG), VAE decode. Each inversion and each denoising is one
compiled `lax.scan` over steps; the step switches of IBA, RA-SA and the ControlNet are per-step
values in the scan inputs (the rules: `pipelines/settings.py`), so one compiled body serves
every step, and they are call-time values, so changing them compiles nothing.

IBA is applied to the conditional branch of classifier-free guidance only (as prompt-to-prompt
and FateZero do): the cache was captured with the prompt, so there it reproduces the inversion's
attention exactly, in every cache mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax import parallel
from freeanimate_jax.diffusion import ddim
from freeanimate_jax.models.attention import AttnControl, LayerInputs, Runtime
from freeanimate_jax.pipelines.common import frame_noise, images_to_vae
from freeanimate_jax.pipelines.core import (
    FRAMES_4D,
    TOKENS,
    CallValues,
    Sampler,
    Step,
    VaeProgram,
    abstract,
    call_values,
    compiled,
    denoise_step,
    execute,
    guide,
    predict,
    report_step,
    vae_encode,
)
from freeanimate_jax.pipelines.settings import CACHE_MODES, AnimateSettings

Array = jax.Array
__all__ = ["CACHE_MODES", "AnimateResult", "AnimateSettings", "FreeAnimate"]


@dataclasses.dataclass
class AnimateResult:
    frames: np.ndarray  # (N, H, W, 3) float in [0, 1]
    preview: np.ndarray
    timings: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Schedule:
    tables: ddim.DDIMTables
    denoise_t: np.ndarray  # descending
    invert_t: np.ndarray  # ascending: inversion step i pairs with denoising step S-1-i

    @classmethod
    def make(cls, cfg: ddim.SchedulerConfig, steps: int) -> Schedule:
        den, inv = ddim.timesteps(cfg, steps), ddim.inverse_timesteps(cfg, steps)
        if not np.array_equal(den[::-1], inv):
            raise ValueError(f"timestep_spacing={cfg.timestep_spacing!r}: inversion and "
                             f"denoising timesteps differ; use 'leading' or 'trailing'")
        return cls(ddim.make_tables(cfg, steps), den, inv)


def _anchor_inputs(anchors: dict, on: Array) -> dict[str, LayerInputs]:
    return {p: LayerInputs(anchor=a, anchor_on=on) for p, a in anchors.items()}


def _video(unet, z: Array) -> bool:
    return unet.has_motion and z.shape[0] > 1  # the frames are one video to the motion modules


# -- stage programs ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InvertReference:
    unet: Any
    runtime: Runtime
    scheduler: ddim.SchedulerConfig
    steps: int
    ra_sa_layers: tuple[str, ...]
    name: str
    display: bool


@compiled
def invert_reference(p: InvertReference, unet_state, z_ref: Array, ctx: Array
                     ) -> tuple[dict, Array]:
    """DDIM-invert the reference latent; returns the RA-SA anchors in denoising order and the
    inverted latent z_T (1, h, w, c)."""
    model, sched = nnx.merge(p.unet, unet_state), Schedule.make(p.scheduler, p.steps)

    def body(z, xs):
        t, i = xs
        ctrl = AttnControl(capture_hidden=p.ra_sa_layers, runtime=p.runtime)
        eps = predict(model, None, z, t, ctx, None, 0.0, ctrl, video=False)
        if p.display:
            report_step(p.name, i)
        return ddim.ddim_inverse_step(sched.tables, eps, t, z), \
            {path: c["hidden"] for path, c in ctrl.captured.items()}

    z_t, anchors = jax.lax.scan(body, z_ref, (jnp.asarray(sched.invert_t),
                                              jnp.arange(p.steps)))
    return jax.tree.map(lambda a: a[::-1], anchors), z_t


@dataclasses.dataclass(frozen=True)
class InvertPreview:
    unet: Any
    controlnet: Any
    runtime: Runtime
    scheduler: ddim.SchedulerConfig
    steps: int
    mode: str
    iba_layers: tuple[str, ...]
    display: bool


@compiled
def invert_preview(p: InvertPreview, unet_state, cn_state, z0: Array, poses: Array, ctx: Array,
                   anchors: dict, call: CallValues) -> tuple[Array, Any]:
    """DDIM-invert the preview with ControlNet + RA-SA, capturing the IBA cache.

    Returns z_T and, in denoising order, the cache: attention inputs (`hidden`), softmax maps
    (`maps`) or the latents each step saw (`recompute`)."""
    unet, cn = nnx.merge(p.unet, unet_state), nnx.merge(p.controlnet, cn_state)
    sched, mode, rt = Schedule.make(p.scheduler, p.steps), p.mode, p.runtime
    xs = (jnp.asarray(sched.invert_t), jnp.arange(p.steps),
          jax.tree.map(lambda a: a[::-1], anchors), call.controlnet, call.ra_sa)

    def body(z, x):
        t, i, anchor, cn_scale, ra_on = x
        ctrl = AttnControl(inputs=_anchor_inputs(anchor, ra_on),
                           capture_hidden=p.iba_layers if mode == "hidden" else (),
                           capture_maps=p.iba_layers if mode == "maps" else (), runtime=rt)
        eps = predict(unet, cn, z, t, ctx, poses, cn_scale, ctrl, video=_video(unet, z))
        if p.display:
            report_step("preview inversion", i)
        cache = z if mode == "recompute" else {path: c[mode] for path, c in ctrl.captured.items()}
        return rt.constrain(ddim.ddim_inverse_step(sched.tables, eps, t, z), FRAMES_4D), cache

    z_t, cache = jax.lax.scan(body, rt.constrain(z0, FRAMES_4D), xs)
    return z_t, jax.tree.map(lambda a: a[::-1], cache)


@dataclasses.dataclass(frozen=True)
class Denoise:
    unet: Any
    controlnet: Any
    runtime: Runtime
    scheduler: ddim.SchedulerConfig
    steps: int
    name: str  # "preview" or "denoise": the progress label and the eta noise stream
    mode: str | None  # the IBA cache mode, None for no IBA (the preview)
    iba_layers: tuple[str, ...]
    cfg: bool
    eta_noise: bool
    display: bool


@compiled
def denoise(p: Denoise, unet_state, cn_state, z_t: Array, poses: Array, ctx_c: Array,
            ctx_u: Array, anchors: dict, cache: Any, call: CallValues) -> Array:
    """CFG denoising with ControlNet + RA-SA, and IBA from `cache` when `mode` is set."""
    unet, cn = nnx.merge(p.unet, unet_state), nnx.merge(p.controlnet, cn_state)
    sched, mode, rt = Schedule.make(p.scheduler, p.steps), p.mode, p.runtime
    xs = (jnp.asarray(sched.denoise_t), jnp.arange(p.steps), anchors, cache, call.controlnet,
          call.ra_sa, call.iba)

    def iba_inputs(z_seen, t, anchor_in, cn_scale, on):
        # `recompute`: rerun the preview branch on the latent the inversion saw at this step.
        def rerun():
            ctrl = AttnControl(inputs=anchor_in, capture_hidden=p.iba_layers, runtime=rt)
            predict(unet, cn, z_seen, t, ctx_c, poses, cn_scale, ctrl, video=_video(unet, z_seen))
            return {path: c["hidden"] for path, c in ctrl.captured.items()}

        shapes = jax.eval_shape(rerun)
        return jax.lax.cond(on, rerun, lambda: jax.tree.map(
            lambda a: jnp.zeros(a.shape, a.dtype), shapes))

    def body(z, x):
        t, i, anchor, step_cache, cn_scale, ra_on, on = x
        anchor_in = _anchor_inputs(anchor, ra_on)
        cond_in = dict(anchor_in)
        if mode is not None:
            kind = "hidden" if mode == "recompute" else mode
            got = iba_inputs(step_cache, t, anchor_in, cn_scale, on) \
                if mode == "recompute" else step_cache
            for path, v in got.items():
                cond_in[path] = dataclasses.replace(cond_in.get(path, LayerInputs()),
                                                    **{kind: v, "iba_on": on})
        video = _video(unet, z)
        eps = predict(unet, cn, z, t, ctx_c, poses, cn_scale,
                      AttnControl(inputs=cond_in, runtime=rt), video=video)
        if p.cfg:
            eps_u = predict(unet, cn, z, t, ctx_u, poses, cn_scale,
                            AttnControl(inputs=anchor_in, runtime=rt), video=video)
            eps = guide(eps, eps_u, call.guidance)
        if p.display:
            report_step(p.name, i)
        z = denoise_step(sched.tables, eps, t, z, i, eta_noise=p.eta_noise, call=call,
                         stream=f"eta/{p.name}", runtime=rt)
        return rt.constrain(z, FRAMES_4D), None

    z0, _ = jax.lax.scan(body, rt.constrain(z_t, FRAMES_4D), xs)
    return z0


@compiled
def preview_start(rt: Runtime, noise: Array, z_ref_t: Array, call: CallValues) -> Array:
    """The preview's starting latents: w * z_ref_T + sqrt(1 - w^2) * noise per frame, w =
    `call.start` (unit variance kept for independent terms). Blended in float32, so a bf16
    run weighs them as set, and w = 0 gives `noise` exactly, w = 1 `z_ref_T`."""
    w = call.start.astype(jnp.float32)
    z = w * z_ref_t.astype(jnp.float32) + jnp.sqrt(1 - w * w) * noise.astype(jnp.float32)
    return rt.constrain(z.astype(noise.dtype), FRAMES_4D)


# -- the pipeline -----------------------------------------------------------------------------
class FreeAnimate(Sampler):
    """FreeAnimate over one set of models (`models.controlnet` the openpose ControlNet).

    `settings` are the defaults of every call; a call may change any of them
    (`pipe(reference, poses, prompt, seed=3, guidance_scale=5.0)`): call-time settings reuse
    the compiled stages, program-fixing ones compile theirs once (`pipelines/settings.py`).
    """

    def __init__(self, models, settings: AnimateSettings | None = None, *, mesh=None,
                 progress=None, runtime: Runtime | None = None):
        if models.controlnet is None:
            raise ValueError("FreeAnimate needs a ControlNet (the pose branch)")
        super().__init__(models, settings or AnimateSettings(), mesh=mesh, progress=progress,
                         runtime=runtime)
        for steps in {self.settings.steps, self.settings.preview_steps}:
            Schedule.make(models.scheduler, steps)  # an uninvertible schedule fails now

    def plan(self, s: AnimateSettings) -> list[Step]:
        """The stages of one call with settings `s`, over named buffers (`host_inputs`)."""
        rt, sched, show = self.runtime, self.models.scheduler, self.display
        unet, cn = self.graph("unet"), self.graph("controlnet")

        def invert(steps: int, name: str, out: str) -> Step:
            program = InvertReference(unet, rt, sched, steps, s.ra_sa_layers, name, show)
            return Step(self.stage(name, invert_reference, program, steps),
                        ("unet", "z_ref", "ctx_c"), ((out, None), (f"{out} z_T", None)))

        def den(name: str, steps: int, mode: str | None) -> Denoise:
            iba = s.iba_layers if mode is not None else ()  # the preview has no IBA
            return Denoise(unet, cn, rt, sched, steps, name, mode, iba, s.cfg, s.eta > 0, show)

        weights = ("unet", "controlnet")
        plan = [self.text_step(s),
                Step(self.stage("VAE encode", vae_encode, VaeProgram(self.graph("vae"), rt),
                                eager=True),
                     ("vae", "reference"), (("z_ref", None),)),
                invert(s.steps, "reference inversion", "anchors")]
        preview_anchors = "anchors"
        if s.preview_steps != s.steps:
            preview_anchors = "preview anchors"
            plan.append(invert(s.preview_steps, "preview reference inversion", preview_anchors))
        inversion = InvertPreview(unet, cn, rt, sched, s.steps, s.cache_mode, s.iba_layers, show)
        plan += [
            Step(self.stage("preview start", preview_start, rt),
                 ("noise", f"{preview_anchors} z_T", "preview call"), (("z_start", 0),)),
            Step(self.stage("preview", denoise, den("preview", s.preview_steps, None),
                            s.preview_steps),
                 (*weights, "z_start", "poses", "ctx_c", "ctx_u", preview_anchors, "no cache",
                  "preview call"), (("z_pre", 0),)),
            Step(self.stage("preview inversion", invert_preview, inversion, s.steps),
                 (*weights, "z_pre", "poses", "ctx_c", "anchors", "inversion call"),
                 (("z_t", 0), ("cache", 1))),
            Step(self.stage("denoise", denoise, den("denoise", s.steps, s.cache_mode), s.steps),
                 (*weights, "z_t", "poses", "ctx_c", "ctx_u", "anchors", "cache",
                  "denoise call"), (("z0", 0),)),
            self.decode_step(s, "z0"),
            self.decode_step(s, "z_pre", "preview decode", "preview frames"),
        ]
        return plan

    def latent_shape(self, size_hw: tuple[int, int]) -> tuple[int, int, int]:
        down = self.models.vae.downscale
        return (size_hw[0] // down, size_hw[1] // down, self.models.unet.cfg.in_channels)

    def initial_latents(self, frames: int, size_hw: tuple[int, int], seed: int | None = None
                        ) -> Array:
        """The preview's starting noise for `frames` frames at `size_hw` pixels, as a call
        with `seed` (default: the settings') draws it: pass it, or your own, as `latents=`."""
        seed = self.settings.seed if seed is None else seed
        return frame_noise(seed, frames, self.latent_shape(size_hw), self.dtype)

    def call_inputs(self, s: AnimateSettings) -> dict[str, tuple[Any, int | None]]:
        """The call-time buffers of `s` as (host value, frame axis or None)."""
        ra, iba = {"ra_sa": s.ra_sa_until}, {"ra_sa": s.ra_sa_until, "iba": s.iba_until}
        preview = dataclasses.replace(call_values(s, s.preview_steps, until=ra),
                                      start=np.float32(s.preview_from_reference))
        return {"preview call": (preview, None),
                "inversion call": (call_values(s, s.steps, reverse=True, until=ra), None),
                "denoise call": (call_values(s, s.steps, until=iba), None),
                "no cache": ({}, None)}

    def host_inputs(self, reference: np.ndarray, poses: np.ndarray, ids: np.ndarray,
                    s: AnimateSettings, latents: Array | np.ndarray | None = None
                    ) -> dict[str, tuple[Any, int | None]]:
        """The plan's input buffers as (value, frame axis or None), before placement: token ids
        of (prompt, negative prompt), the reference, the preview's noise (frames padded to the
        mesh), the control images and the call-time values."""
        n, size_hw = poses.shape[0], tuple(poses.shape[1:3])
        n_pad = parallel.padded_frames(n, self.mesh)
        if self.models.unet.has_motion:
            parallel.check_frames(n, self.mesh, "FreeAnimate with a motion module")
        if latents is None:
            noise = frame_noise(s.seed, n_pad, self.latent_shape(size_hw), self.dtype)
        else:
            want = (n, *self.latent_shape(size_hw))
            if tuple(np.shape(latents)) != want:
                raise ValueError(f"latents of shape {tuple(np.shape(latents))}; expected {want} "
                                 f"(frames, latent height, latent width, channels)")
            noise = jnp.asarray(parallel.pad_frames(np.asarray(latents), n_pad), self.dtype)
        pose_in = jnp.asarray(parallel.pad_frames(poses, n_pad), jnp.float32).astype(
            self.dtype) / 255.0
        return {"ids": (ids, None), "reference": (images_to_vae(reference[None], self.dtype), None),
                "noise": (noise, 0), "poses": (pose_in, 0), **self.call_inputs(s)}

    def input_specs(self, frames: int, size_hw: tuple[int, int], s: AnimateSettings
                    ) -> dict[str, tuple[Any, int | None]]:
        """Shapes, dtypes and placement of every buffer of the plan for `frames` frames at
        `size_hw` (what `fit` lowers), from `host_inputs` itself."""
        host = self.host_inputs(np.zeros((*size_hw, 3), np.uint8),
                                np.zeros((frames, *size_hw, 3), np.uint8),
                                np.zeros((2, TOKENS), np.int32), s)
        weights = {k: (v, None) for k, v in self.weights().items()}
        return {k: (abstract(v), axis) for k, (v, axis) in {**weights, **host}.items()}

    def __call__(self, reference: np.ndarray, poses: np.ndarray, prompt: str = "", *,
                 latents: Array | np.ndarray | None = None, **settings: Any) -> AnimateResult:
        """`reference` (H, W, 3) and `poses` (N, H, W, 3) uint8 at the model size; `latents`:
        the preview's starting noise (N, H/8, W/8, 4), default `initial_latents` (blended
        with the inverted reference by `preview_from_reference`); `settings`:
        any `AnimateSettings` field, for this call only."""
        s = self.settings.with_call(**settings)
        n, timings = poses.shape[0], {}
        host = self.host_inputs(reference, poses, self.token_ids(prompt, s.negative_prompt), s,
                                latents)
        buffers = {**self.weights(), **{k: self.place(v, axis) for k, (v, axis) in host.items()}}
        execute(self.plan(s), buffers, self.progress, timings)
        return AnimateResult(self.to_host(buffers["frames"], n),
                             self.to_host(buffers["preview frames"], n), timings)
