"""The DDIM scheduler configuration: the subset of a diffusers scheduler config that the step
math depends on. Plain Python (no JAX), so configuration code can use it cheaply."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
}
# Keys diffusers knows whose only supported value here is the one listed (None = absent/null).
_MUST_BE = {"thresholding": (False, None), "trained_betas": (None,),
            "set_alpha_to_zero": (None,)}


# The samplers of `samplers.py` beside DDIM: short name -> diffusers class ("..._karras": with
# `use_karras_sigmas=True`). Here, free of JAX, for the settings to validate.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_karras": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}


def sampler_kind(name: str) -> str:
    """The short name of a sampler given by short name or diffusers class name."""
    if name in SAMPLERS:
        return name
    by_class = {v: k for k, v in SAMPLERS.items() if not k.endswith("_karras")}
    if name in by_class:
        return by_class[name]
    raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SAMPLERS)} "
                     f"(or the diffusers class names "
                     f"{', '.join(sorted(set(SAMPLERS.values())))})")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The subset of a diffusers DDIM config that the math depends on; defaults are DDIM's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if not isinstance(v, kind) or (f.type in ("int", "float") and isinstance(v, bool)):
                raise ValueError(f"scheduler config: {f.name}={v!r} is not a {f.type}")
            if f.type == "float":
                object.__setattr__(self, f.name, float(v))
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"scheduler config: unsupported {key}={getattr(self, key)!r}; "
                                 f"supported: {', '.join(allowed)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"scheduler config: num_train_timesteps={self.num_train_timesteps} "
                             "must be at least 2")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Accepts any diffusers scheduler config: keys that do not change DDIM are ignored,
        but a setting we would silently get wrong (thresholding, trained betas) is an error."""
        for key, allowed in _MUST_BE.items():
            if key in d and not any(d[key] is a for a in allowed):
                raise ValueError(f"scheduler config: unsupported {key}={d[key]!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None
                        ) -> SchedulerConfig:
        """Reads `scheduler_config.json` as saved by diffusers (`subfolder="scheduler"` for a
        whole pipeline folder)."""
        path = Path(folder, subfolder or "", "scheduler_config.json")
        return cls.from_dict(json.loads(path.read_text()))
