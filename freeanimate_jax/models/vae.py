"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE) in Flax NNX, channels-last.

Module and attribute names follow diffusers exactly so flat parameter paths equal its
state-dict keys (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...). Only the plain 2D
Encoder/Decoder block types are built; anything else fails at construction, not at load time.

Images and latents are NHWC. `encode` returns the Gaussian's (mean, logvar) rather than a
distribution object so it stays a pure array function; sampling is the caller's, with its own
key. `chunk=k` runs the batch k frames at a time under `jax.lax.map`, bounding activation memory
for long videos without changing the result (every op here is per-sample).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from freeanimate_jax.models.attention import (
    Attention,
    AttnControl,
    Runtime,
    name_attention_layers,
    plain,
)
from freeanimate_jax.models.layers import Conv2d, GroupNorm, activation, silu

Array = jax.Array

# diffusers hard-codes these in Encoder/Decoder rather than reading the config.
_EPS = 1e-6
# diffusers' get_down_block/get_up_block strip this legacy prefix before dispatching.
_LEGACY_PREFIX = "UNetRes"
# Pre-0.14 diffusers checkpoints name the VAE attention projections like this.
_DEPRECATED_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class ResnetBlock2D(nnx.Module):
    """diffusers' ResnetBlock2D without a time embedding (`temb_channels=None`), as the VAE uses.

    output_scale_factor is 1 and dropout is inert at inference, so neither appears.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, eps: float,
                 act: Callable[[Array], Array], rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.act = act
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, **kw)
                              if in_channels != out_channels else None)

    def __call__(self, x: Array) -> Array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. The encoder uses diffusers' `padding=0` variant, which pads only the
    bottom/right by one pixel, so a symmetric pad here would shift every latent by half a pixel."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs,
                           param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (PyTorch's `F.interpolate(mode="nearest")`) then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.conv = Conv2d(channels, channels, 3, padding=1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ResnetStack(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down- or upsampler.

    The two diffusers classes differ only in the resampler, and the attribute it sits under
    (`downsamplers` / `upsamplers`) keeps the parameter paths apart.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *,
                 resample: str | None, groups: int, act: Callable[[Array], Array],
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                          eps=_EPS, act=act, **kw) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)]) \
            if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if resample == "up" else None

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in (self.downsamplers or []):
            x = sampler(x)
        for sampler in (self.upsamplers or []):
            x = sampler(x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet, (single-head self-attention, resnet): diffusers' UNetMidBlock2D, num_layers=1.

    diffusers builds the attention with `attention_head_dim = channels`, i.e. one head over
    all channels, GroupNorm with the resnet eps, biased q/k/v and a residual connection.
    """

    def __init__(self, channels: int, *, add_attention: bool, groups: int,
                 act: Callable[[Array], Array], rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, eps=_EPS,
                                               act=act, **kw) for _ in range(2)])
        self.attentions = nnx.List([
            Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                      eps=_EPS, residual_connection=True, **kw)]) if add_attention else None

    def __call__(self, x: Array, ctrl: AttnControl | None = None) -> Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x, None, ctrl)
        return self.resnets[1](x)


def _block_types(types: list[str], expected: str, what: str, n_levels: int) -> None:
    names = [t[len(_LEGACY_PREFIX):] if t.startswith(_LEGACY_PREFIX) else t for t in types]
    bad = sorted({t for t in names if t != expected})
    if bad:
        raise ValueError(f"AutoencoderKL: unsupported {what} {bad}; only {expected!r} is "
                         f"implemented")
    if len(names) != n_levels:
        raise ValueError(f"AutoencoderKL: {len(names)} {what} for {n_levels} "
                         f"block_out_channels; they must match")


class Encoder(nnx.Module):
    """conv_in, down blocks (no downsample on the last), mid block, norm/SiLU/conv_out to
    2*latent channels (mean and logvar)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: list[int],
                 layers_per_block: int, groups: int, act: Callable[[Array], Array],
                 add_attention: bool, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans = block_out_channels
        self.conv_in = Conv2d(in_channels, chans[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List([
            ResnetStack(chans[max(i - 1, 0)], c, layers_per_block,
                        resample="down" if i < len(chans) - 1 else None, groups=groups, act=act,
                        **kw) for i, c in enumerate(chans)])
        self.mid_block = UNetMidBlock2D(chans[-1], add_attention=add_attention, groups=groups,
                                        act=act, **kw)
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, param_dtype=param_dtype)
        self.conv_out = Conv2d(chans[-1], 2 * latent_channels, 3, padding=1, **kw)

    def __call__(self, x: Array, ctrl: AttnControl | None = None) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x, ctrl)
        # diffusers' conv_act is nn.SiLU regardless of act_fn.
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """conv_in, mid block, up blocks of layers_per_block+1 resnets (no upsample on the last),
    norm/SiLU/conv_out."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: list[int],
                 layers_per_block: int, groups: int, act: Callable[[Array], Array],
                 add_attention: bool, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        rev = list(reversed(block_out_channels))
        self.conv_in = Conv2d(latent_channels, rev[0], 3, padding=1, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], add_attention=add_attention, groups=groups,
                                        act=act, **kw)
        self.up_blocks = nnx.List([
            ResnetStack(rev[max(i - 1, 0)], c, layers_per_block + 1,
                        resample="up" if i < len(rev) - 1 else None, groups=groups, act=act,
                        **kw) for i, c in enumerate(rev)])
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=_EPS, param_dtype=param_dtype)
        self.conv_out = Conv2d(rev[-1], out_channels, 3, padding=1, **kw)

    def __call__(self, z: Array, ctrl: AttnControl | None = None) -> Array:
        x = self.mid_block(self.conv_in(z), ctrl)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


def _chunked(fn: Callable[[Array], Array], x: Array, chunk: int | None):
    """fn over x in chunks of `chunk` samples, sequentially, so only one chunk's activations
    are live. A ragged tail is zero-padded (samples never interact) and sliced off.

    Chunks are strided, not contiguous: chunk c holds samples c, c + n, c + 2n, ... (n chunks).
    With the batch sharded over D devices in contiguous blocks, `chunk` a multiple of D and
    the batch a multiple of `chunk` (no padding), every device then works on its own samples in
    every chunk; contiguous chunks would gather each chunk from a fraction of the devices onto
    all of them.
    """
    n = x.shape[0]
    if chunk is None or n <= chunk:
        return fn(x)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk}")
    pad = -n % chunk
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    out = jax.lax.map(fn, rearrange(xs, "(j c) ... -> c j ...", j=chunk))
    return jax.tree.map(lambda y: rearrange(y, "c j ... -> (j c) ...")[:n], out)


class AutoencoderKL(nnx.Module):
    """The SD VAE. Images are in [-1, 1], NHWC; latents NHWC, unscaled (apply
    `scaling_factor`/`shift_factor` yourself, as diffusers pipelines do)."""

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
                 block_out_channels: tuple[int, ...] = (64,), layers_per_block: int = 1,
                 act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 scaling_factor: float = 0.18215, shift_factor: float | None = None,
                 use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        chans = [int(c) for c in block_out_channels]
        _block_types(list(down_block_types), "DownEncoderBlock2D", "down_block_types", len(chans))
        _block_types(list(up_block_types), "UpDecoderBlock2D", "up_block_types", len(chans))
        act = activation(act_fn.lower())  # diffusers' get_activation lower-cases too
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        common = (chans, layers_per_block, norm_num_groups, act, mid_block_add_attention)
        self.encoder = Encoder(in_channels, latent_channels, *common, **kw)
        self.decoder = Decoder(latent_channels, out_channels, *common, **kw)
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1, **kw) \
            if use_quant_conv else None
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1, **kw) \
            if use_post_quant_conv else None
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        self.latent_channels = latent_channels
        self.downscale = 2 ** (len(chans) - 1)
        name_attention_layers(self)

    @classmethod
    def from_config(cls, config: Mapping, *, rngs: nnx.Rngs,
                    param_dtype=jnp.float32) -> AutoencoderKL:
        """Build from a diffusers config.json dict; keys this port does not use (sample_size,
        force_upcast, latents_mean/std, `_`-prefixed metadata) are ignored."""
        keys = ("in_channels", "out_channels", "down_block_types", "up_block_types",
                "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
                "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv",
                "use_post_quant_conv", "mid_block_add_attention")
        # None means "the default" in diffusers configs, except for shift_factor where it is
        # the value (no shift), which is also our default.
        kwargs = {k: config[k] for k in keys if config.get(k) is not None}
        return cls(**kwargs, rngs=rngs, param_dtype=param_dtype)

    @staticmethod
    def torch_key(key: str) -> str:
        """Accept old checkpoints' attention names (query/key/value/proj_attn) as diffusers
        itself does when loading them."""
        m = _DEPRECATED_ATTN.match(key)
        if m is None:
            return key
        return f"{m.group(1)}.{_DEPRECATED_NAMES[m.group(2)]}.{key[m.end():]}"

    def encode(self, x: Array, *, chunk: int | None = None,
               runtime: Runtime | None = None) -> tuple[Array, Array]:
        """Image (B, H, W, C) -> (mean, logvar) of the latent Gaussian, each (B, H/f, W/f, L).

        logvar is clamped to [-30, 20] exactly as diffusers' DiagonalGaussianDistribution.
        `runtime`: the attention kernel and device layout (see models/attention.py).
        """
        ctrl = plain(runtime) if runtime is not None else None

        def moments(xb: Array) -> tuple[Array, Array]:
            h = self.encoder(xb, ctrl)
            h = self.quant_conv(h) if self.quant_conv is not None else h
            mean, logvar = jnp.split(h, 2, axis=-1)
            return mean, jnp.clip(logvar, -30.0, 20.0)

        return _chunked(moments, x, chunk)

    def decode(self, z: Array, *, chunk: int | None = None,
               runtime: Runtime | None = None) -> Array:
        """Latent (B, h, w, L), unscaled -> image (B, h*f, w*f, C)."""
        ctrl = plain(runtime) if runtime is not None else None

        def dec(zb: Array) -> Array:
            if self.post_quant_conv is not None:
                zb = self.post_quant_conv(zb)
            return self.decoder(zb, ctrl)

        return _chunked(dec, z, chunk)

    def __call__(self, x: Array, *, chunk: int | None = None,
                 runtime: Runtime | None = None) -> Array:
        """Deterministic reconstruction: decode the posterior mean."""
        return self.decode(self.encode(x, chunk=chunk, runtime=runtime)[0], chunk=chunk,
                           runtime=runtime)
