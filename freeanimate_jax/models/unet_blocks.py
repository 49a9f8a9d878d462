"""Blocks shared by the UNet and the ControlNet: resnets, spatial transformers, down/mid/up.

Each block class serves both of diffusers' variants (with and without cross-attention) through
one switch, so parameter paths (`down_blocks.1.attentions.0...`) match diffusers either way.
Every block threads the optional `AttnControl` through to its attention layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, repeat
from flax import nnx

from freeanimate_jax.models.attention import Attention, AttnControl
from freeanimate_jax.models.layers import (
    Conv2d,
    GroupNorm,
    Identity,
    LayerNorm,
    Linear,
    activation,
    gelu_exact,
)

Array = jax.Array


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> Array:
    """diffusers' `get_timestep_embedding`, in fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, dim: int, act_fn: str, *, rngs: nnx.Rngs, param_dtype):
        self.linear_1 = Linear(in_dim, dim, rngs=rngs, param_dtype=param_dtype)
        self.linear_2 = Linear(dim, dim, rngs=rngs, param_dtype=param_dtype)
        self.act = activation(act_fn)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """GroupNorm-act-conv twice, time embedding added between; 1x1 shortcut on channel change."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, *, groups: int, eps: float,
                 act_fn: str = "silu", output_scale_factor: float = 1.0, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_ch, eps=eps, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.time_emb_proj = Linear(temb_ch, out_ch, **kw) if temb_ch else None
        self.norm2 = GroupNorm(groups, out_ch, eps=eps, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None
        self.act = activation(act_fn)
        self.output_scale_factor = output_scale_factor
        self.norm_across_frames = False  # AnimateDiff v1 normalised video resnets over all frames

    def _norm(self, norm: GroupNorm, x: Array, frames: int | None) -> Array:
        if not (self.norm_across_frames and frames):
            return norm(x)
        return rearrange(norm(rearrange(x, "(b f) h w c -> b (f h) w c", f=frames)),
                         "b (f h) w c -> (b f) h w c", f=frames)

    def __call__(self, x: Array, temb: Array | None, frames: int | None = None) -> Array:
        h = self.conv1(self.act(self._norm(self.norm1, x, frames)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self._norm(self.norm2, h, frames)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs, param_dtype):
        self.proj = Linear(dim, inner * 2, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * gelu_exact(gate)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, param_dtype):
        inner = dim * mult
        # net.1 is PyTorch's Dropout: a placeholder keeps `net.2` at index 2.
        self.net = nnx.List([GEGLU(dim, inner, rngs=rngs, param_dtype=param_dtype), Identity(),
                             Linear(inner, dim, rngs=rngs, param_dtype=param_dtype)])

    def __call__(self, x: Array) -> Array:
        return self.net[2](self.net[0](x))


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """AnimateDiff's fixed position table: sin at even, cos at odd channels."""
    pos = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * (-math.log(10000.0) / dim))
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return pe


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention (or, with `cross_dim=None`, a second self-attention, as
    in AnimateDiff's temporal blocks), GEGLU feed-forward. `positions` adds AnimateDiff's
    sinusoidal table to the normed input of both attentions."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_dim: int | None, *,
                 positions: int | None = None, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        # A temporal block (with positions) attends over frames: its batch is pixels.
        axis = "frames" if positions is None else "temporal_tokens"
        self.norm1 = LayerNorm(dim, param_dtype=param_dtype)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, batch_axis=axis, **kw)
        self.norm2 = LayerNorm(dim, param_dtype=param_dtype)
        self.attn2 = Attention(dim, cross_attention_dim=cross_dim, heads=heads,
                               dim_head=dim_head, batch_axis=axis, **kw)
        self.norm3 = LayerNorm(dim, param_dtype=param_dtype)
        self.ff = FeedForward(dim, **kw)
        self.cross = cross_dim is not None
        self.positions = positions

    def _pos(self, h: Array) -> Array:
        if self.positions is None:
            return h
        if h.shape[1] > self.positions:
            raise ValueError(f"{h.shape[1]} frames exceed the motion module's position table "
                             f"({self.positions}); use context windows for longer videos")
        pe = sinusoidal_positions(self.positions, h.shape[-1])[:h.shape[1]]
        return h + jnp.asarray(pe, h.dtype)[None]

    def __call__(self, x: Array, context: Array | None, ctrl: AttnControl | None) -> Array:
        x = x + self.attn1(self._pos(self.norm1(x)), None, ctrl)
        x = x + self.attn2(self._pos(self.norm2(x)), context if self.cross else None, ctrl)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv or linear), blocks, proj_out, residual."""

    def __init__(self, channels: int, heads: int, cross_dim: int, *, num_layers: int = 1,
                 groups: int = 32, use_linear_projection: bool = False, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.linear = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6, param_dtype=param_dtype)
        proj = (lambda: Linear(channels, channels, **kw)) if use_linear_projection \
            else (lambda: Conv2d(channels, channels, 1, **kw))
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, cross_dim, **kw)
            for _ in range(num_layers)])
        self.proj_out = proj()

    def __call__(self, x_bhwc: Array, context: Array, ctrl: AttnControl | None) -> Array:
        h, w = x_bhwc.shape[1:3]
        y = self.norm(x_bhwc)
        # The 1x1 conv and the linear projection differ only in where the flatten happens.
        if not self.linear:
            y = self.proj_in(y)
        y = rearrange(y, "b h w c -> b (h w) c")
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, ctrl)
        if self.linear:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b h w c", h=h, w=w)
        if not self.linear:
            y = self.proj_out(y)
        return y + x_bhwc


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1, rngs=rngs,
                           param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


def upsample_nearest(x_bhwc: Array, size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour upsampling with PyTorch's index rule (src = floor(dst * in / out))."""
    h, w = x_bhwc.shape[1:3]
    oh, ow = size or (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return repeat(x_bhwc, "b h w c -> b (h i) (w j) c", i=2, j=2)
    rows = jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32)
    return x_bhwc[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv = Conv2d(channels, channels, 3, padding=1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
        return self.conv(upsample_nearest(x, size))


def _motion(block: nnx.Module, i: int, x: Array, frames: int | None,
            ctrl: AttnControl | None) -> Array:
    """The block's i-th motion module on a video batch ((b f) h w c); identity otherwise."""
    if block.motion_modules is None or not frames:
        return x
    return block.motion_modules[i](x, frames, ctrl)


class BlockArgs:
    """What every down/mid/up block needs from the model config (resolved once in the model)."""

    def __init__(self, *, temb_ch: int, groups: int, eps: float, act_fn: str, cross_dim: int,
                 use_linear_projection: bool, rngs: nnx.Rngs, param_dtype):
        self.temb_ch, self.groups, self.eps, self.act_fn = temb_ch, groups, eps, act_fn
        self.cross_dim, self.linear = cross_dim, use_linear_projection
        self.rngs, self.param_dtype = rngs, param_dtype

    def resnet(self, in_ch: int, out_ch: int) -> ResnetBlock2D:
        return ResnetBlock2D(in_ch, out_ch, self.temb_ch, groups=self.groups, eps=self.eps,
                             act_fn=self.act_fn, rngs=self.rngs, param_dtype=self.param_dtype)

    def transformer(self, ch: int, heads: int, layers: int) -> Transformer2DModel:
        return Transformer2DModel(ch, heads, self.cross_dim, num_layers=layers,
                                  groups=self.groups, use_linear_projection=self.linear,
                                  rngs=self.rngs, param_dtype=self.param_dtype)


class DownBlock(nnx.Module):
    """diffusers' CrossAttnDownBlock2D (`heads` given) or DownBlock2D (`heads=None`)."""

    def __init__(self, a: BlockArgs, in_ch: int, out_ch: int, *, num_layers: int,
                 heads: int | None, transformer_layers: int = 1, add_downsample: bool):
        self.resnets = nnx.List([a.resnet(in_ch if i == 0 else out_ch, out_ch)
                                 for i in range(num_layers)])
        self.attentions = nnx.List([a.transformer(out_ch, heads, transformer_layers)
                                    for _ in range(num_layers)]) if heads else None
        self.downsamplers = nnx.List([Downsample2D(out_ch, rngs=a.rngs,
                                                   param_dtype=a.param_dtype)]) \
            if add_downsample else None
        self.motion_modules = None  # AnimateDiff inserts one after each (resnet, attention)

    def __call__(self, x: Array, temb: Array, context: Array, ctrl: AttnControl | None,
                 frames: int | None = None) -> tuple[Array, list[Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, ctrl)
            x = _motion(self, i, x, frames, ctrl)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, a: BlockArgs, ch: int, *, heads: int, transformer_layers: int = 1):
        self.resnets = nnx.List([a.resnet(ch, ch), a.resnet(ch, ch)])
        self.attentions = nnx.List([a.transformer(ch, heads, transformer_layers)])
        self.motion_modules = None

    def __call__(self, x: Array, temb: Array, context: Array, ctrl: AttnControl | None,
                 frames: int | None = None) -> Array:
        x = self.resnets[0](x, temb, frames)
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:], strict=True)):
            x = resnet(_motion(self, i, attn(x, context, ctrl), frames, ctrl), temb, frames)
        return x


class UpBlock(nnx.Module):
    """diffusers' CrossAttnUpBlock2D (`heads` given) or UpBlock2D (`heads=None`)."""

    def __init__(self, a: BlockArgs, in_ch: int, prev_out_ch: int, out_ch: int, *,
                 num_layers: int, heads: int | None, transformer_layers: int = 1,
                 add_upsample: bool):
        resnets = []
        for i in range(num_layers):
            skip_ch = in_ch if i == num_layers - 1 else out_ch
            resnets.append(a.resnet((prev_out_ch if i == 0 else out_ch) + skip_ch, out_ch))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([a.transformer(out_ch, heads, transformer_layers)
                                    for _ in range(num_layers)]) if heads else None
        self.upsamplers = nnx.List([Upsample2D(out_ch, rngs=a.rngs, param_dtype=a.param_dtype)]) \
            if add_upsample else None
        self.motion_modules = None

    def __call__(self, x: Array, skips: list[Array], temb: Array, context: Array,
                 ctrl: AttnControl | None, upsample_size: tuple[int, int] | None = None,
                 frames: int | None = None) -> Array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb, frames)
            if self.attentions is not None:
                x = self.attentions[i](x, context, ctrl)
            x = _motion(self, i, x, frames, ctrl)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
