"""FreeAnimate: reference image + poses (+ prompt) -> video, training-free.

Stages (DESIGN.md): reference DDIM inversion (capturing the RA-SA anchors per step), preview
generation (ControlNet + RA-SA + CFG), preview DDIM inversion (capturing the IBA cache), final
denoising (ControlNet + RA-SA + IBA + CFG), VAE decode. Each inversion and each denoising is one
jit-compiled `lax.scan` over steps; step ranges for IBA / RA-SA / ControlNet are per-step values
in the scan inputs, so one compiled body serves every step.

IBA is applied to the conditional branch of classifier-free guidance only (as prompt-to-prompt
and FateZero do): the cache was captured with the prompt, so there it reproduces the inversion's
attention exactly, in every cache mode.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from freeanimate_jax import parallel
from freeanimate_jax.diffusion import ddim
from freeanimate_jax.models.attention import AttnControl
from freeanimate_jax.pipelines.common import (
    Progress,
    Pure,
    decode_latents,
    encode_latents,
    encode_prompts,
    frame_noise,
    images_to_vae,
    report_step,
    vae_to_images,
)

Array = jax.Array
CACHE_MODES = ("maps", "hidden", "recompute")


@dataclasses.dataclass(frozen=True)
class AnimateSettings:
    steps: int = 25
    preview_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    controlnet_scale: float = 1.0
    controlnet_start: float = 0.0  # fractions of the denoising steps, from the first
    controlnet_end: float = 1.0
    # Spatial self-attention only: `attentions` excludes motion modules' temporal layers.
    iba_layers: tuple[str, ...] = ("up_blocks.*.attentions.*.attn1",)
    iba_until: float = 0.8
    ra_sa_layers: tuple[str, ...] = ("*.attentions.*.attn1",)
    ra_sa_until: float = 1.0
    cache_mode: str = "hidden"
    eta: float = 0.0
    seed: int = 0
    vae_chunk: int = 8
    clip_skip: int | None = None

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode={self.cache_mode!r}; expected one of {CACHE_MODES}")
        if self.steps < 1 or self.preview_steps < 1:
            raise ValueError("steps and preview_steps must be at least 1")
        for name in ("controlnet_start", "controlnet_end", "iba_until", "ra_sa_until"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be a fraction in [0, 1]")


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

    def flags(self, until: float) -> np.ndarray:
        """Denoising-order booleans: the first `until` fraction of steps is on."""
        n = len(self.denoise_t)
        return np.arange(n) < round(until * n)


def _controlnet_scales(s: AnimateSettings, n: int) -> np.ndarray:
    frac = np.arange(n) / n
    on = (frac >= s.controlnet_start) & (frac < s.controlnet_end)
    return np.where(on, s.controlnet_scale, 0.0).astype(np.float32)


def _eps(unet, controlnet, z, t, ctx, poses, cn_scale, ctrl: AttnControl | None):
    ctx = jnp.broadcast_to(ctx, (z.shape[0],) + ctx.shape[1:])
    down = mid = None
    if controlnet is not None:
        down, mid = controlnet(z, t, ctx, poses, conditioning_scale=cn_scale)
    if unet.has_motion and z.shape[0] > 1:  # the frames are one video to the motion modules
        eps, cap = unet(z[None], t, ctx, down, mid, attn=ctrl)
        return eps[0], cap
    return unet(z, t, ctx, down, mid, attn=ctrl)


def _anchor_inputs(anchors: dict, gate) -> dict:
    return {p: {"anchor": a, "anchor_gate": gate} for p, a in anchors.items()}


class FreeAnimate:
    """Compiled FreeAnimate stages over one set of models; call with images and a prompt."""

    def __init__(self, models, settings: AnimateSettings, *, mesh=None,
                 progress: Progress | None = None):
        if models.controlnet is None:
            raise ValueError("FreeAnimate needs a ControlNet (the pose branch)")
        self.models, self.s, self.mesh, self.progress = models, settings, mesh, progress
        parallel.replicate_models(
            (models.unet, models.controlnet, models.vae, models.text_encoder), mesh)
        self.unet, self.cn = Pure.of(models.unet), Pure.of(models.controlnet)
        self.dtype = jax.tree.leaves(self.unet.state)[0].dtype
        self.sched = Schedule.make(models.scheduler, settings.steps)
        self.preview_sched = (self.sched if settings.preview_steps == settings.steps
                              else Schedule.make(models.scheduler, settings.preview_steps))
        # One compiled function per stage; schedules and modes are bound, not traced.
        self.stages = {
            "reference inversion": jax.jit(partial(self._invert_reference, self.sched)),
            "preview reference inversion": jax.jit(partial(self._invert_reference,
                                                           self.preview_sched)),
            "preview": jax.jit(partial(self._denoise, stage="preview",
                                       sched=self.preview_sched, mode=None)),
            "preview inversion": jax.jit(self._invert_preview),
            "denoise": jax.jit(partial(self._denoise, stage="denoise", sched=self.sched,
                                       mode=settings.cache_mode)),
        }

    # -- sharding ---------------------------------------------------------------------------
    def _frames(self, x: Array, axis: int = 0) -> Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, parallel.frame_sharding(self.mesh, x.ndim, axis))

    # -- stages -------------------------------------------------------------------------------
    def _invert_reference(self, sched: Schedule, unet_state, z_ref, ctx):
        """DDIM-invert the reference latent; returns RA-SA anchors in denoising order."""
        unet = self.unet.bind(unet_state)
        n = len(sched.invert_t)

        def body(z, xs):
            t, i = xs
            ctrl = AttnControl(capture_hidden=self.s.ra_sa_layers)
            eps, cap = unet(z, t, ctx, attn=ctrl)
            report_step(self.progress, "reference inversion", i)
            return ddim.ddim_inverse_step(sched.tables, eps, t, z), \
                {p: c["hidden"] for p, c in cap.items()}

        _, anchors = jax.lax.scan(body, z_ref, (jnp.asarray(sched.invert_t), jnp.arange(n)))
        return jax.tree.map(lambda a: a[::-1], anchors)

    def _invert_preview(self, unet_state, cn_state, z0, poses, ctx, anchors):
        """DDIM-invert the preview with ControlNet + RA-SA, capturing the IBA cache.

        Returns z_T and, in denoising order, the cache: attention inputs (`hidden`), softmax maps
        (`maps`) or the latents each step saw (`recompute`)."""
        unet, cn = self.unet.bind(unet_state), self.cn.bind(cn_state)
        sched, mode, s = self.sched, self.s.cache_mode, self.s
        n = len(sched.invert_t)
        rev = lambda a: jnp.asarray(a[::-1])  # noqa: E731  (denoising order -> inversion order)
        xs = (jnp.asarray(sched.invert_t), jnp.arange(n), jax.tree.map(lambda a: a[::-1], anchors),
              rev(_controlnet_scales(s, n)), rev(sched.flags(s.ra_sa_until)))

        def body(z, x):
            t, i, anchor, cn_scale, ra_on = x
            ctrl = AttnControl(inputs=_anchor_inputs(anchor, ra_on),
                               capture_hidden=s.iba_layers if mode == "hidden" else (),
                               capture_maps=s.iba_layers if mode == "maps" else ())
            eps, cap = _eps(unet, cn, z, t, ctx, poses, cn_scale, ctrl)
            report_step(self.progress, "preview inversion", i)
            cache = z if mode == "recompute" else {p: c[mode] for p, c in cap.items()}
            return self._frames(ddim.ddim_inverse_step(sched.tables, eps, t, z)), cache

        z_t, cache = jax.lax.scan(body, self._frames(z0), xs)
        return z_t, jax.tree.map(lambda a: a[::-1], cache)

    def _denoise(self, unet_state, cn_state, z_t, poses, ctx_c, ctx_u, anchors, cache, *,
                 stage: str, sched: Schedule, mode: str | None):
        """CFG denoising with ControlNet + RA-SA, and IBA from `cache` when `mode` is set."""
        unet, cn, s = self.unet.bind(unet_state), self.cn.bind(cn_state), self.s
        n = len(sched.denoise_t)
        iba_on = jnp.asarray(sched.flags(s.iba_until))
        xs = (jnp.asarray(sched.denoise_t), jnp.arange(n), anchors, cache,
              jnp.asarray(_controlnet_scales(s, n)), jnp.asarray(sched.flags(s.ra_sa_until)),
              iba_on)

        def iba_inputs(z_seen, t, anchor_in, cn_scale, on):
            # `recompute`: rerun the preview branch on the latent the inversion saw at this step.
            def rerun():
                ctrl = AttnControl(inputs=anchor_in, capture_hidden=s.iba_layers)
                _, cap = _eps(unet, cn, z_seen, t, ctx_c, poses, cn_scale, ctrl)
                return {p: c["hidden"] for p, c in cap.items()}

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
                for p, v in got.items():
                    cond_in[p] = {**cond_in.get(p, {}), kind: v, "iba_gate": on}
            eps, _ = _eps(unet, cn, z, t, ctx_c, poses, cn_scale, AttnControl(inputs=cond_in))
            if s.guidance_scale != 1.0:
                eps_u, _ = _eps(unet, cn, z, t, ctx_u, poses, cn_scale,
                                AttnControl(inputs=anchor_in))
                eps = eps_u + s.guidance_scale * (eps - eps_u)
            noise = None
            if s.eta > 0:
                noise = self._frames(frame_noise(s.seed, z.shape[0], z.shape[1:], z.dtype,
                                                 f"eta/{stage}", i))
            report_step(self.progress, stage, i)
            return self._frames(ddim.ddim_step(sched.tables, eps, t, z, eta=s.eta,
                                               noise=noise)), None

        z0, _ = jax.lax.scan(body, self._frames(z_t), xs)
        return z0

    # -- the whole job ------------------------------------------------------------------------
    def __call__(self, reference: np.ndarray, poses: np.ndarray, prompt: str = "") -> AnimateResult:
        """`reference` (H, W, 3) and `poses` (N, H, W, 3) uint8 at the model size."""
        m, s, timings = self.models, self.s, {}
        n = poses.shape[0]
        n_pad = parallel.padded_frames(n, self.mesh) if self.mesh is not None else n
        if n_pad != n and m.unet.has_motion:
            raise ValueError(f"{n} frames do not divide over {self.mesh.size} devices; with a "
                             f"motion module padding would change the video: use a multiple "
                             f"of {self.mesh.size}")
        poses_pad = parallel.pad_frames(poses, n_pad)
        clock = time.perf_counter()

        def lap(name, value):
            nonlocal clock
            jax.block_until_ready(value)
            timings[name] = time.perf_counter() - clock
            clock = time.perf_counter()
            return value

        ctx_c, ctx_u = lap("text", encode_prompts(m.text_encoder, m.tokenizer,
                                                  [prompt, s.negative_prompt], s.clip_skip)
                           .astype(self.dtype)[:, None])
        z_ref = lap("encode", encode_latents(m.vae, images_to_vae(reference[None], self.dtype)))
        pose_in = jnp.asarray(poses_pad, jnp.float32).astype(self.dtype) / 255.0
        if self.mesh is not None:
            pose_in = parallel.shard_frames(pose_in, self.mesh)
        stage_steps = {"reference inversion": s.steps, "preview": s.preview_steps,
                       "preview inversion": s.steps, "denoise": s.steps}
        if self.progress is not None:
            for name, total in stage_steps.items():
                self.progress.stage(name, total)
        st, weights = self.stages, (self.unet.state, self.cn.state)
        anchors = lap("reference inversion",
                      st["reference inversion"](self.unet.state, z_ref, ctx_c))
        preview_anchors = anchors if self.preview_sched is self.sched else \
            st["preview reference inversion"](self.unet.state, z_ref, ctx_c)
        noise = frame_noise(s.seed, n_pad, z_ref.shape[1:], self.dtype)
        z_pre = lap("preview", st["preview"](*weights, noise, pose_in, ctx_c, ctx_u,
                                             preview_anchors, {}))
        z_t, cache = lap("preview inversion", st["preview inversion"](
            *weights, z_pre, pose_in, ctx_c, anchors))
        z0 = lap("denoise", st["denoise"](*weights, z_t, pose_in, ctx_c, ctx_u, anchors, cache))
        frames = lap("decode", vae_to_images(decode_latents(m.vae, z0[:n], s.vae_chunk)))
        preview = vae_to_images(decode_latents(m.vae, z_pre[:n], s.vae_chunk))
        return AnimateResult(parallel.to_host(frames), parallel.to_host(preview), timings)
