"""Leaf layers whose parameter names are PyTorch's (`weight`, `bias`).

Every model in this package is built from these, so a model's flat parameter paths equal the
diffusers/transformers state-dict keys. Each layer declares in `TORCH_LAYOUT` how a PyTorch
tensor maps to ours (a transpose), which is the whole "transpose table" of weight loading.

Compute happens in the dtype of the input; parameters are cast to it. Norms accumulate in fp32.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


# Within `host_init(seed)`, random weights come from one NumPy generator instead of JAX's
# PRNG: building a small model draws hundreds of differently shaped arrays, and each shape is a
# separately compiled JAX program (the tiny demo family took 25-60 s that way, under 2 s so).
_HOST_RNG: contextvars.ContextVar[np.random.Generator | None] = contextvars.ContextVar(
    "host_rng", default=None)


@contextlib.contextmanager
def host_init(seed: int) -> Iterator[None]:
    """Random weights of the modules built inside drawn on the host from `seed` (the same
    distributions as JAX's initialisation, other values), deterministic on every machine."""
    token = _HOST_RNG.set(np.random.default_rng(seed))
    try:
        yield
    finally:
        _HOST_RNG.reset(token)


def _uniform(rngs: nnx.Rngs, shape: Sequence[int], fan_in: int, dtype) -> Array:
    # PyTorch's default init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    if (gen := _HOST_RNG.get()) is not None:
        return jnp.asarray(gen.uniform(-bound, bound, tuple(shape)).astype(dtype))
    return jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)


def _full(value: float, shape: Sequence[int], dtype) -> Array:
    # From the host: jnp.ones would compile one small program per shape.
    return jnp.asarray(np.full(tuple(shape), value, dtype))


class Linear(nnx.Module):
    """y = x W + b with W stored (in, out); PyTorch stores (out, in)."""

    TORCH_LAYOUT = {"weight": (1, 0)}

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nnx.Param(_uniform(rngs, (in_features, out_features), in_features,
                                         param_dtype))
        self.bias = (nnx.Param(_uniform(rngs, (out_features,), in_features, param_dtype))
                     if bias else None)

    def __call__(self, x: Array) -> Array:
        y = x @ self.weight[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Conv2d(nnx.Module):
    """NHWC convolution, kernel stored HWIO; PyTorch stores OIHW.

    `padding` is an int (symmetric) or ((top, bottom), (left, right)) for the VAE's
    asymmetric downsampling pad.
    """

    TORCH_LAYOUT = {"weight": (2, 3, 1, 0)}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 stride: int = 1, padding: int | tuple = 0, bias: bool = True,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        k = kernel_size
        fan_in = in_channels * k * k
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) \
            else tuple(tuple(p) for p in padding)
        self.weight = nnx.Param(_uniform(rngs, (k, k, in_channels, out_channels), fan_in,
                                         param_dtype))
        self.bias = (nnx.Param(_uniform(rngs, (out_channels,), fan_in, param_dtype))
                     if bias else None)

    def __call__(self, x_nhwc: Array) -> Array:
        y = jax.lax.conv_general_dilated(
            x_nhwc, self.weight[...].astype(x_nhwc.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class GroupNorm(nnx.Module):
    """GroupNorm over the last (channel) axis and all spatial/token axes between."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 affine: bool = True, rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible into "
                             f"{num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = nnx.Param(_full(1, (num_channels,), param_dtype)) if affine else None
        self.bias = nnx.Param(_full(0, (num_channels,), param_dtype)) if affine else None

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        b, c = x.shape[0], x.shape[-1]
        xg = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis. eps defaults to PyTorch's 1e-5 (Flax's is 1e-6)."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True,
                 rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(_full(1, (num_features,), param_dtype)) if affine else None
        self.bias = nnx.Param(_full(0, (num_features,), param_dtype)) if affine else None

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if (gen := _HOST_RNG.get()) is not None:
            table = jnp.asarray((gen.standard_normal((num_embeddings, features)) * 0.02)
                                .astype(param_dtype))
        else:
            table = jax.random.normal(rngs.params(), (num_embeddings, features),
                                      param_dtype) * 0.02
        self.weight = nnx.Param(table)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0)


class Identity(nnx.Module):
    """Stands where PyTorch has a parameterless module (Dropout) so list indices match."""

    def __call__(self, x: Array) -> Array:
        return x


def silu(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


def gelu_exact(x: Array) -> Array:
    # PyTorch's nn.GELU default is the erf form; jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"silu": silu, "swish": silu, "gelu": gelu_exact, "quick_gelu": quick_gelu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "relu": jax.nn.relu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}


def activation(name: str):
    """diffusers' `get_activation`: case-insensitive names."""
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; expected one of "
                         f"{sorted(ACTIVATIONS)}") from None
