"""Pipeline objects in diffusers' shape: `from_pretrained(...)`, then a call taking diffusers'
argument names and returning an output with `.frames`.

    pipe = AnimateDiffPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                               motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    video = pipe("a corgi running", num_frames=16, num_inference_steps=25, generator=0).frames[0]

They are thin: models come from the library's assembly (`weights/assemble.py`, as the CLI's),
sampling from `Generate` / `FreeAnimate` (compiled once per program-fixing setting; every
call-time setting is traced), so they give those classes' frames for the same settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from freeanimate_jax import config as cfg
from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig
from freeanimate_jax.pipelines.schedulers import DDIMScheduler, SchedulerMixin

__all__ = ["AnimateDiffPipeline", "FreeAnimatePipeline", "PipelineOutput"]
OUTPUT_TYPES = ("np", "pil", "latent")


@dataclasses.dataclass
class PipelineOutput:
    """`frames`: one entry per video, (F, H, W, 3) float in [0, 1] ("np"), a list of PIL images
    ("pil") or the final latents (F, C, H/8, W/8) in diffusers' channel order ("latent")."""

    frames: list[Any]
    latents: list[np.ndarray] | None = None  # with return_latents=True: (F, C, h, w) each


def _seed(generator: Any, seed: int | None) -> int:
    """diffusers' `generator` (a torch.Generator's initial seed, or an int) or `seed`."""
    if generator is None:
        return 0 if seed is None else int(seed)
    if isinstance(generator, int | np.integer):
        return int(generator)
    if hasattr(generator, "initial_seed"):
        return int(generator.initial_seed())
    raise TypeError(f"generator={generator!r}; expected an int seed or a torch.Generator")


def _check_output(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")


def _video_out(frames: np.ndarray, latents: np.ndarray, output_type: str) -> Any:
    if output_type == "latent":
        return np.transpose(latents, (0, 3, 1, 2))
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(np.round(f * 255).astype(np.uint8)) for f in frames]
    return frames


def _to_ours(latents: Any, frames: int) -> np.ndarray:
    """diffusers' AnimateDiff latents (1, C, F, h, w), or ours (F, h, w, C)."""
    z = np.asarray(latents, np.float32)
    if z.ndim == 5:
        if z.shape[0] != 1:
            raise ValueError(f"latents of shape {z.shape}: one video at a time; expected "
                             f"(1, C, F, h, w)")
        z = np.transpose(z[0], (1, 2, 3, 0))
    if z.ndim != 4 or z.shape[0] != frames:
        raise ValueError(f"latents of shape {np.shape(latents)}; expected (1, C, {frames}, h, w) "
                         f"or ({frames}, h, w, C)")
    return z


class _Pipeline:
    SETTINGS: type
    job_schema: type[cfg.Job]

    def __init__(self, models: Any, *, mesh: Any = None, scheduler: SchedulerMixin | None = None):
        self.models, self.mesh = models, mesh
        self.scheduler = scheduler or DDIMScheduler.from_config(
            dataclasses.asdict(models.scheduler))
        self._sampler = None

    @classmethod
    def _load(cls, model: str, dtype: Any, **keys: Any) -> Any:
        from freeanimate_jax.weights import assemble

        job = cfg.load_job(None, [], schema=cls.job_schema,
                           flags={"model": model, **{k: v for k, v in keys.items()
                                                     if v is not None}})
        return assemble.load_models(job, jnp.dtype(dtype))

    def _sync_scheduler(self) -> str:
        """The scheduler set on the pipeline, as our noise table and sampler name."""
        self.models.scheduler = SchedulerConfig.from_dict(self.scheduler.config)
        return self.scheduler.kind

    def sampler(self) -> Any:
        if self._sampler is None:
            self._sampler = self._make_sampler()
        return self._sampler


class AnimateDiffPipeline(_Pipeline):
    """AnimateDiff text-to-video (`Generate`), optionally with a per-frame ControlNet."""

    job_schema = cfg.GenerateJob

    @classmethod
    def from_pretrained(cls, model: str = cfg.SD15_MODEL, *,
                        motion_adapter: str = cfg.MOTION_ADAPTER, controlnet: str | None = None,
                        lora: Sequence[str] = (), motion_lora: Sequence[str] = (),
                        domain_adapter: str | None = None, dtype: Any = jnp.float32,
                        mesh: Any = None) -> AnimateDiffPipeline:
        """Models from hub ids or folders (`builtin:tiny` for the demo family), LoRAs as
        FILE[:SCALE] or hf://owner/repo/file, as the `generate` command takes them."""
        models = cls._load(model, dtype, motion_module=motion_adapter,
                           controlnet=controlnet or "", lora=list(lora),
                           motion_lora=list(motion_lora), domain_adapter=domain_adapter)
        return cls(models, mesh=mesh)

    def _make_sampler(self) -> Any:
        from freeanimate_jax.pipelines.generate import Generate, GenerateSettings

        return Generate(self.models, GenerateSettings(), mesh=self.mesh)

    def __call__(self, prompt: str = "", num_frames: int = 16, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, negative_prompt: str | None = None,
                 eta: float = 0.0, generator: Any = None, latents: Any = None,
                 conditioning_frames: np.ndarray | None = None,
                 controlnet_conditioning_scale: float = 1.0, num_videos_per_prompt: int = 1,
                 output_type: str = "np", decode_chunk_size: int | None = None,
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 return_latents: bool = False, seed: int | None = None,
                 callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 **settings: Any) -> PipelineOutput:
        """diffusers' AnimateDiffPipeline call: one video per `num_videos_per_prompt` (seeds
        seed, seed+1, ...); `latents` in diffusers' layout (1, C, F, h, w) scaled by the
        scheduler's `init_noise_sigma` as diffusers does; `conditioning_frames` (F, H, W, 3)
        uint8 for a ControlNet; other `GenerateSettings` fields by name (e.g. context_length).

        `callback_on_step_end(pipe, step, timestep, {"latents": (1, C, F, h, w)})` is called
        after every denoising step, as in diffusers, with NumPy latents (once per video: with
        `num_videos_per_prompt` > 1 the steps restart for each). It observes: what it returns
        is not fed back (the loop is one compiled scan on the device). It runs inside a host
        callback of that scan, so it must not call JAX (keep the latents, decode afterwards);
        an exception in it ends the call as an XLA runtime error."""
        _check_output(output_type)
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs="
                             f"{list(callback_on_step_end_tensor_inputs)}; expected ['latents']")
        step_end = None
        if callback_on_step_end is not None:
            def step_end(i: int, t: Any, z: np.ndarray) -> None:
                callback_on_step_end(self, i, t, {
                    "latents": np.transpose(z, (3, 0, 1, 2))[None]})
        pipe = self.sampler()
        size = (height or 512, width or height or 512)
        kind = self._sync_scheduler()
        base = _seed(generator, seed)
        call = dict(frames=num_frames, steps=num_inference_steps,
                    guidance_scale=guidance_scale, negative_prompt=negative_prompt or "",
                    eta=eta, scheduler=kind, controlnet_scale=controlnet_conditioning_scale,
                    **({"vae_chunk": decode_chunk_size} if decode_chunk_size else {}), **settings)
        videos, finals = [], []
        for i in range(num_videos_per_prompt):
            z = None if latents is None else _to_ours(latents, num_frames)
            result = pipe(prompt, size, conditioning_frames, latents=z, seed=base + i,
                          prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, step_end=step_end,
                          **call)
            videos.append(_video_out(result.frames, result.latents, output_type))
            finals.append(np.transpose(result.latents, (0, 3, 1, 2)))
        return PipelineOutput(videos, finals if return_latents else None)


class FreeAnimatePipeline(_Pipeline):
    """FreeAnimate: a reference image animated through a pose sequence (`FreeAnimate`)."""

    job_schema = cfg.AnimateJob

    @classmethod
    def from_pretrained(cls, model: str = cfg.SD15_MODEL, *,
                        controlnet: str = cfg.OPENPOSE_CONTROLNET,
                        motion_adapter: str | None = None, lora: Sequence[str] = (),
                        dtype: Any = jnp.float32, mesh: Any = None) -> FreeAnimatePipeline:
        models = cls._load(model, dtype, controlnet=controlnet,
                           motion_module=motion_adapter or "", lora=list(lora))
        return cls(models, mesh=mesh)

    def _make_sampler(self) -> Any:
        from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate

        return FreeAnimate(self.models, AnimateSettings(), mesh=self.mesh)

    def __call__(self, image: np.ndarray, poses: np.ndarray, prompt: str = "",
                 num_inference_steps: int = 25, guidance_scale: float = 7.5,
                 negative_prompt: str | None = None, generator: Any = None,
                 latents: Any = None, controlnet_conditioning_scale: float = 1.0,
                 output_type: str = "np", return_latents: bool = False,
                 seed: int | None = None, **settings: Any) -> PipelineOutput:
        """`image` (H, W, 3) and `poses` (F, H, W, 3) uint8 at the model size (letterbox with
        `freeanimate_jax.io` first); `latents`: the preview's starting noise, (1, C, F, h, w)
        or (F, h, w, C), blended with the inverted reference by `preview_from_reference`;
        other `AnimateSettings` fields by name (iba_until, cache_mode, ...)."""
        _check_output(output_type)
        if output_type == "latent" or return_latents:
            raise ValueError("FreeAnimatePipeline returns frames (np or pil): its latents are "
                             "internal to its stages")
        if self._sync_scheduler() != "ddim":
            raise ValueError(f"scheduler {type(self.scheduler).__name__}: FreeAnimate samples "
                             f"with DDIM, the scheduler its inversion is exact for")
        pipe = self.sampler()
        z = None if latents is None else _to_ours(latents, len(poses))
        result = pipe(image, poses, prompt, latents=z, seed=_seed(generator, seed),
                      steps=num_inference_steps, guidance_scale=guidance_scale,
                      negative_prompt=negative_prompt or "",
                      controlnet_scale=controlnet_conditioning_scale, **settings)
        return PipelineOutput([_video_out(result.frames, None, output_type)])
