"""Primitives of the sampling core (`core.py`): pure model handles, VAE in/out, named noise
streams, the progress display."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax.pipelines.progress import Progress  # noqa: F401  (re-exported)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Pure:
    """A model as (graphdef, params) so jitted functions take weights as arguments (and can be
    compiled with abstract weights for fit checks)."""

    graphdef: Any
    state: Any

    @classmethod
    def of(cls, model: nnx.Module) -> Pure:
        graphdef, state = nnx.split(model)
        return cls(graphdef, state)

    def bind(self, state) -> nnx.Module:
        return nnx.merge(self.graphdef, state)


def images_to_vae(images_uint8: np.ndarray, dtype) -> Array:
    return jnp.asarray(images_uint8, jnp.float32).astype(dtype) / 127.5 - 1.0


def vae_to_images(x: Array) -> Array:
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def encode_latents(vae, images: Array, chunk: int | None = None, *, runtime=None) -> Array:
    """Images in [-1, 1] -> scaled latent means (the deterministic encoding diffusers uses for
    inversion)."""
    mean, _ = vae.encode(images, chunk=chunk, runtime=runtime)
    shift = getattr(vae, "shift_factor", None) or 0.0
    return (mean - shift) * vae.scaling_factor


def decode_latents(vae, z: Array, chunk: int | None = None, *, runtime=None) -> Array:
    shift = getattr(vae, "shift_factor", None) or 0.0
    z = z / vae.scaling_factor + shift
    return vae.decode(z, chunk=chunk, runtime=runtime)


def frame_noise(seed: int | Array, n_frames: int, shape: tuple[int, ...], dtype=jnp.float32,
                stream: str = "noise", step: Array | int | None = None) -> Array:
    """Per-frame noise from `fold_in(seed, frame)` (and the step, for per-step noise):
    independent of device count and padding. `seed` may be traced (a uint32 of the seed's
    bits, as `jax.random.key` takes them)."""
    base = jax.random.fold_in(jax.random.key(seed), _stream_id(stream))
    if step is not None:
        base = jax.random.fold_in(base, step)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n_frames))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys).astype(dtype)


def _stream_id(name: str) -> int:
    # A stable small integer per named random stream (Python's hash() is salted per process).
    return zlib.crc32(name.encode()) & 0x7FFFFFFF
