"""Training data: the WebVid-folder / synthetic tfds builder (ArrayRecord), PyAV decoding and a
grain pipeline whose batch at a step is a pure function of (seed, step).

Submodules are imported on use: `builder` pulls in tensorflow-datasets, `pipeline` does not.
"""

from freeanimate_jax.data.errors import DataError

__all__ = ["DataError"]
