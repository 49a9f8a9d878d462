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

_LAZY = {"load": "freeanimate_jax.weights.loader",
         "load_pipeline": "freeanimate_jax.weights.pipeline"}
__all__ = ["load", "load_pipeline", "WeightsError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freeanimate_jax' has no attribute {name!r}")
