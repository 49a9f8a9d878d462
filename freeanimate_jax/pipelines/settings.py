"""Sampling settings of the pipelines: typed, frozen, validated, and free of JAX (the CLI and
the config loader import them before any device work).

Two kinds of field, as diffusers' pipeline arguments are:

- fields that fix the compiled program (steps, frame count, cache mode, which layers get IBA or
  RA-SA, context windows, chunking): changing one compiles the stages again, once, and the
  compiled stages are kept for the next call with the same values;
- call-time fields (`CALL_TIME`: prompt-side text, seed, guidance, ControlNet scale and range,
  eta, the IBA/RA-SA step fractions, FreeAnimate's `preview_from_reference`): traced
  arguments of the compiled stages, accepted per call, never a recompile. Two of their
  properties do fix the program, as in diffusers: whether classifier-free guidance runs at all
  (guidance above 1) and whether eta noise is drawn (eta above 0).

Step switches, the same rule in every stage, each over its own step count S (preview, preview
inversion and final denoise alike; an inversion visits the steps in reverse): the ControlNet
runs at denoising step i exactly when diffusers' `control_guidance_start/end` keep it,
i.e. unless ``i / S < controlnet_start or (i + 1) / S > controlnet_end``; IBA (RA-SA) is on for
the first ``floor(until * S + 1/2)`` steps, the fraction rounded half up exactly (it does not
depend on binary round-off or on round-half-to-even).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from freeanimate_jax.diffusion.scheduler_config import sampler_kind

CACHE_MODES = ("maps", "hidden", "recompute")
SEED_RANGE = (-(2 ** 31), 2 ** 32)  # what one 32-bit PRNG seed word holds


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What every sampling pipeline shares."""

    # Fields a call may change without compiling (see the module docstring).
    CALL_TIME: ClassVar[tuple[str, ...]] = (
        "guidance_scale", "negative_prompt", "eta", "seed", "controlnet_scale",
        "controlnet_start", "controlnet_end")
    # Listed first where the fields are shown (config sections, help, errors): what sizes a run.
    FIRST: ClassVar[tuple[str, ...]] = ("steps",)

    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    eta: float = 0.0
    # ddim | euler | euler_karras | euler_ancestral | dpmpp_2m | dpmpp_2m_karras | lcm (or
    # diffusers' class names), over the model's own noise table; eta is DDIM's alone.
    scheduler: str = "ddim"
    seed: int = 0
    controlnet_scale: float = 1.0
    controlnet_start: float = 0.0  # fractions of the denoising steps, from the first
    controlnet_end: float = 1.0
    vae_chunk: int = 8
    clip_skip: int | None = None

    def __post_init__(self) -> None:
        for name in ("controlnet_start", "controlnet_end"):
            _fraction(self, name)
        if self.controlnet_start >= self.controlnet_end:
            raise ValueError(f"controlnet_start={self.controlnet_start} must be below "
                             f"controlnet_end={self.controlnet_end}")
        if self.eta < 0:
            raise ValueError(f"eta={self.eta} must be at least 0")
        object.__setattr__(self, "scheduler", sampler_kind(self.scheduler))
        if self.scheduler != "ddim" and self.eta > 0:
            raise ValueError(f"eta={self.eta} is DDIM's; scheduler={self.scheduler} takes none")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed={self.seed} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]})")
        if self.vae_chunk < 1:
            raise ValueError(f"vae_chunk={self.vae_chunk} must be at least 1")
        if self.clip_skip is not None and self.clip_skip < 1:
            raise ValueError(f"clip_skip={self.clip_skip} must be at least 1 (or null)")

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance runs: guidance_scale above 1, as diffusers decides
        (below 1 it is the conditional prediction alone, not an extrapolation away from it)."""
        return self.guidance_scale > 1.0

    @classmethod
    def ordered_fields(cls) -> list[dataclasses.Field]:
        """The fields, `FIRST` first, the rest in declaration order."""
        fields = dataclasses.fields(cls)
        return sorted(fields, key=lambda f: cls.FIRST.index(f.name) if f.name in cls.FIRST
                      else len(cls.FIRST))

    def with_call(self, **changes) -> SamplingSettings:
        """These settings with per-call `changes` (any field; unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; expected some of "
                            f"{', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


def _fraction(s: SamplingSettings, name: str) -> None:
    if not 0.0 <= getattr(s, name) <= 1.0:
        raise ValueError(f"{name}={getattr(s, name)} must be a fraction in [0, 1]")


@dataclasses.dataclass(frozen=True)
class AnimateSettings(SamplingSettings):
    """FreeAnimate: reference inversion, preview, preview inversion, IBA/RA-SA denoising."""

    CALL_TIME: ClassVar[tuple[str, ...]] = (*SamplingSettings.CALL_TIME, "iba_until",
                                            "ra_sa_until", "preview_from_reference")
    FIRST: ClassVar[tuple[str, ...]] = ("steps", "preview_steps")

    preview_steps: int = 25
    # Spatial self-attention only: `attentions` excludes motion modules' temporal layers.
    iba_layers: tuple[str, ...] = ("up_blocks.*.attentions.*.attn1",)
    iba_until: float = 0.8
    ra_sa_layers: tuple[str, ...] = ("*.attentions.*.attn1",)
    ra_sa_until: float = 1.0
    cache_mode: str = "hidden"
    # The preview's starting latent of frame i: w * z_ref_T + sqrt(1 - w^2) * noise_i, where
    # z_ref_T is the reference's own DDIM inversion (over preview_steps) and w this weight.
    # 0 (the default, and what earlier releases did): independent noise per frame; 1: every
    # frame starts from the inverted reference, so the reference's colours and layout seed
    # every frame and the ControlNet moves only the figure (docs/QUALITY.md measures it).
    preview_from_reference: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.preview_steps < 1:
            raise ValueError("steps and preview_steps must be at least 1")
        super().__post_init__()
        if self.scheduler != "ddim":
            raise ValueError(f"scheduler={self.scheduler}: FreeAnimate samples with DDIM, the "
                             f"scheduler its DDIM inversion is exact for (generate takes any)")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode={self.cache_mode!r}; expected one of {CACHE_MODES}")
        for name in ("iba_until", "ra_sa_until", "preview_from_reference"):
            _fraction(self, name)


@dataclasses.dataclass(frozen=True)
class GenerateSettings(SamplingSettings):
    """AnimateDiff text-to-video, optionally with a per-frame ControlNet and context windows."""

    FIRST: ClassVar[tuple[str, ...]] = ("frames", "steps")

    frames: int = 16
    context_length: int | None = None  # None: no windows (frames must fit the position table)
    context_stride: int = 4
    window_batch: int = 1  # windows per UNet call: memory against speed

    def __post_init__(self) -> None:
        if self.frames < 1 or self.steps < 1:
            raise ValueError("frames and steps must be at least 1")
        super().__post_init__()
        if self.window_batch < 1:
            raise ValueError(f"window_batch={self.window_batch} must be at least 1")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length={self.context_length} must be at least 1 "
                             f"(or null)")
        if self.context_stride < 1:
            raise ValueError(f"context_stride={self.context_stride} must be at least 1")
