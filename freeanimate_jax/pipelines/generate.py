"""AnimateDiff text-to-video: prompt + a personalised SD 1.5 with motion modules -> video.

One jit-compiled `lax.scan` over DDIM steps with classifier-free guidance, an optional
per-frame ControlNet, and sliding context windows for videos longer than the motion module's
position table. Frames shard over the mesh like the animate pipeline's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from freeanimate_jax import parallel
from freeanimate_jax.diffusion import ddim
from freeanimate_jax.pipelines.common import (
    Progress,
    Pure,
    decode_latents,
    encode_prompts,
    frame_noise,
    report_step,
    vae_to_images,
)
from freeanimate_jax.pipelines.context import blend, freenoise_order, make_windows

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    frames: int = 16
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    eta: float = 0.0
    seed: int = 0
    context_length: int | None = None  # None: no windows (frames must fit the position table)
    context_stride: int = 4
    window_batch: int = 1  # windows per UNet call: memory against speed
    controlnet_scale: float = 1.0
    vae_chunk: int = 8
    clip_skip: int | None = None

    def __post_init__(self) -> None:
        if self.frames < 1 or self.steps < 1:
            raise ValueError("frames and steps must be at least 1")
        if self.window_batch < 1:
            raise ValueError("window_batch must be at least 1")


@dataclasses.dataclass
class GenerateResult:
    frames: np.ndarray  # (F, H, W, 3) float in [0, 1]
    timings: dict[str, float]


class Generate:
    """Compiled text-to-video sampling over one set of models (`models.unet` a
    UNetMotionModel; `models.controlnet` optional)."""

    def __init__(self, models, settings: GenerateSettings, *, mesh=None,
                 progress: Progress | None = None):
        # Padding frames would change what temporal attention sees: require a fit.
        if mesh is not None and settings.frames % mesh.size:
            raise ValueError(f"{settings.frames} frames do not divide over {mesh.size} "
                             f"devices; use a multiple of {mesh.size}")
        self.models, self.s, self.mesh, self.progress = models, settings, mesh, progress
        parallel.replicate_models(
            (models.unet, models.controlnet, models.vae, models.text_encoder), mesh)
        self.unet = Pure.of(models.unet)
        self.cn = Pure.of(models.controlnet) if models.controlnet is not None else None
        self.dtype = jax.tree.leaves(self.unet.state)[0].dtype
        self.tables = ddim.make_tables(models.scheduler, settings.steps)
        self.timesteps = ddim.timesteps(models.scheduler, settings.steps)
        self.windows = make_windows(settings.frames, settings.context_length,
                                    settings.context_stride)
        self.denoise = jax.jit(self._denoise)

    def _video_eps(self, unet, cn, z: Array, t: Array, ctx: Array, poses: Array | None
                   ) -> Array:
        """Noise prediction for all frames (F, h, w, c), window by window, blended."""
        s, win = self.s, self.windows

        def one(index: Array) -> Array:
            zw = z[index][None]  # (1, L, h, w, c)
            down = mid = None
            if cn is not None and poses is not None:
                frames_ctx = jnp.broadcast_to(ctx, (index.shape[0],) + ctx.shape[1:])
                down, mid = cn(zw[0], t, frames_ctx, poses[index],
                               conditioning_scale=s.controlnet_scale)
            return unet(zw, t, ctx, down, mid)[0]

        if win.count == 1:
            return one(jnp.asarray(win.index[0]))
        per_window = jax.lax.map(one, jnp.asarray(win.index), batch_size=s.window_batch)
        return blend(per_window, win, z.shape[0])

    def _denoise(self, unet_state, cn_state, z: Array, ctx_c: Array, ctx_u: Array,
                 poses: Array | None) -> Array:
        unet = self.unet.bind(unet_state)
        cn = self.cn.bind(cn_state) if self.cn is not None else None
        s = self.s

        def body(z, x):
            t, i = x
            eps = self._video_eps(unet, cn, z, t, ctx_c, poses)
            if s.guidance_scale != 1.0:
                eps_u = self._video_eps(unet, cn, z, t, ctx_u, poses)
                eps = eps_u + s.guidance_scale * (eps - eps_u)
            noise = None
            if s.eta > 0:
                noise = frame_noise(s.seed, z.shape[0], z.shape[1:], z.dtype, "eta/generate", i)
            report_step(self.progress, "denoise", i)
            return ddim.ddim_step(self.tables, eps, t, z, eta=s.eta, noise=noise), None

        steps = (jnp.asarray(self.timesteps), jnp.arange(len(self.timesteps)))
        z0, _ = jax.lax.scan(body, z, steps)
        return z0

    def initial_noise(self, latent_hw: tuple[int, int]) -> Array:
        s = self.s
        shape = (*latent_hw, self.models.unet.cfg.in_channels)
        base = frame_noise(s.seed, s.frames, shape, self.dtype)
        order = freenoise_order(s.frames, s.context_length, s.context_stride, s.seed)
        return base[jnp.asarray(order)]

    def __call__(self, prompt: str, size_hw: tuple[int, int],
                 poses: np.ndarray | None = None) -> GenerateResult:
        """`poses` (F, H, W, 3) uint8 at `size_hw` when a ControlNet is loaded."""
        m, s, timings = self.models, self.s, {}
        if poses is not None and len(poses) != s.frames:
            raise ValueError(f"{len(poses)} control frames for a {s.frames}-frame video")
        scale = getattr(m.vae, "downscale", 8)
        if size_hw[0] % scale or size_hw[1] % scale:
            raise ValueError(f"size {size_hw} is not a multiple of the VAE's {scale}")
        clock = time.perf_counter()
        ctx = encode_prompts(m.text_encoder, m.tokenizer, [prompt, s.negative_prompt],
                             s.clip_skip).astype(self.dtype)
        z = self.initial_noise((size_hw[0] // scale, size_hw[1] // scale))
        pose_in = None if poses is None else jnp.asarray(poses, self.dtype) / 255.0
        if self.progress is not None:
            self.progress.stage("denoise", s.steps)
        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with mesh_ctx:
            if self.mesh is not None:
                z = parallel.shard_frames(z, self.mesh)
                if pose_in is not None:  # each device keeps only its frames' control images
                    pose_in = parallel.shard_frames(pose_in, self.mesh)
            z0 = self.denoise(self.unet.state, self.cn.state if self.cn else None, z,
                              ctx[:1], ctx[1:], pose_in)
            z0 = jax.block_until_ready(z0)
        timings["denoise"] = time.perf_counter() - clock
        frames = vae_to_images(decode_latents(m.vae, z0, s.vae_chunk))
        timings["total"] = time.perf_counter() - clock
        return GenerateResult(parallel.to_host(frames), timings)
