"""freeanimate-jax: FreeAnimate human image animation and AnimateDiff motion modules in JAX.

The names below load lazily, so `import freeanimate_jax.config` (the command line's argument
checks) does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from freeanimate_jax import platform as _platform
from freeanimate_jax.weights.errors import WeightsError

_platform.settle()  # before JAX is imported: no libtpu error block on a host without TPUs

_LAZY = {
    "load": "freeanimate_jax.weights.loader",
    "load_pipeline": "freeanimate_jax.weights.pipeline",
    # diffusers-shaped pipeline objects and their schedulers
    "AnimateDiffPipeline": "freeanimate_jax.pipelines.objects",
    "FreeAnimatePipeline": "freeanimate_jax.pipelines.objects",
    "DDIMScheduler": "freeanimate_jax.pipelines.schedulers",
    "EulerDiscreteScheduler": "freeanimate_jax.pipelines.schedulers",
    "EulerAncestralDiscreteScheduler": "freeanimate_jax.pipelines.schedulers",
    "DPMSolverMultistepScheduler": "freeanimate_jax.pipelines.schedulers",
    "LCMScheduler": "freeanimate_jax.pipelines.schedulers",
    # the sampling classes underneath, their settings, and the tiny demo family
    "FreeAnimate": "freeanimate_jax.pipelines.animate",
    "Generate": "freeanimate_jax.pipelines.generate",
    "AnimateSettings": "freeanimate_jax.pipelines.settings",
    "GenerateSettings": "freeanimate_jax.pipelines.settings",
    "tiny_models": "freeanimate_jax.demo",
    "tiny_motion_adapter": "freeanimate_jax.demo",
}
__all__ = [*_LAZY, "WeightsError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freeanimate_jax' has no attribute {name!r}")
