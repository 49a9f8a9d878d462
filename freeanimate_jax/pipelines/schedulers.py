"""Scheduler objects named as diffusers names them, for the pipeline objects:
`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)` works as in
diffusers. Each holds a config (diffusers' keys) and names its sampler (`diffusion/samplers.py`,
or DDIM); the math stays in `diffusion/`. Plain Python: no JAX at import."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig

__all__ = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
           "EulerDiscreteScheduler", "LCMScheduler", "SchedulerMixin", "from_kind"]


# diffusers keys whose other values these samplers do not implement: (key, supported value).
_ONLY_DEFAULT = {"final_sigmas_type": "zero", "lower_order_final": True, "euler_at_final": False,
                 "use_lu_lambdas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "original_inference_steps": 50,
                 "timestep_scaling": 10.0, "interpolation_type": "linear", "thresholding": False,
                 "variance_type": None, "timestep_type": "discrete"}


class SchedulerMixin:
    """A diffusers-style scheduler handle: `config` (a dict of diffusers' keys) and `kind`."""

    KIND: ClassVar[str] = "ddim"

    def __init__(self, **config: Any):
        for key, want in _ONLY_DEFAULT.items():
            if key in config and config[key] != want and not (want is None and not config[key]):
                raise ValueError(f"{type(self).__name__}: {key}={config[key]!r} is not "
                                 f"supported; expected {want!r}")
        names = {f.name for f in dataclasses.fields(SchedulerConfig)}
        defaults = dataclasses.asdict(SchedulerConfig())
        self.config = {**defaults, **{k: v for k, v in config.items() if k in names},
                       **{k: v for k, v in config.items() if k not in names}}
        SchedulerConfig.from_dict(self.config)  # a setting we would get wrong fails here

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **changes: Any) -> SchedulerMixin:
        """This scheduler over another's config (its noise table), as diffusers' `from_config`;
        `changes` override keys (e.g. use_karras_sigmas=True)."""
        return cls(**{**dict(config), **changes})

    @property
    def kind(self) -> str:
        return self.KIND

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class DDIMScheduler(SchedulerMixin):
    KIND = "ddim"


class EulerDiscreteScheduler(SchedulerMixin):
    """Euler; Karras sigmas with use_karras_sigmas=True."""

    KIND = "euler"

    @property
    def kind(self) -> str:
        return "euler_karras" if self.config.get("use_karras_sigmas") else "euler"


class EulerAncestralDiscreteScheduler(SchedulerMixin):
    KIND = "euler_ancestral"


class DPMSolverMultistepScheduler(SchedulerMixin):
    """DPM++ 2M (algorithm_type dpmsolver++, solver_order 2, midpoint); Karras sigmas with
    use_karras_sigmas=True."""

    KIND = "dpmpp_2m"
    _ONLY = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}

    def __init__(self, **config: Any):
        for key, want in self._ONLY.items():
            if config.get(key, want) != want:
                raise ValueError(f"DPMSolverMultistepScheduler: {key}={config[key]!r}; "
                                 f"supported: {want!r} (DPM++ 2M)")
        super().__init__(**config)

    @property
    def kind(self) -> str:
        return "dpmpp_2m_karras" if self.config.get("use_karras_sigmas") else "dpmpp_2m"


class LCMScheduler(SchedulerMixin):
    KIND = "lcm"


def from_kind(kind: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """The scheduler object of a sampler name (`GenerateSettings.scheduler`) over `config`."""
    classes = {c.KIND: c for c in (DDIMScheduler, EulerDiscreteScheduler,
                                   EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler,
                                   LCMScheduler)}
    if kind.endswith("_karras"):
        return classes[kind.removesuffix("_karras")].from_config(config, use_karras_sigmas=True)
    return classes[kind].from_config(config)
