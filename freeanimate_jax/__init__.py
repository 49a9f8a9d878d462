"""freeanimate-jax: FreeAnimate human image animation and AnimateDiff motion modules in JAX."""

from freeanimate_jax.weights.convert import WeightsError
from freeanimate_jax.weights.loader import load
from freeanimate_jax.weights.pipeline import load_pipeline

__all__ = ["load", "load_pipeline", "WeightsError"]
__version__ = "0.1.0"
