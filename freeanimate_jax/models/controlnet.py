"""ControlNetModel in Flax NNX: the UNet's encoder half plus zero convs, diffusers names.

Used as a plug-in control branch (openpose for FreeAnimate): residuals add to the UNet's skip
connections and mid block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from freeanimate_jax.models.attention import AttnControl, name_attention_layers
from freeanimate_jax.models.layers import Conv2d, silu
from freeanimate_jax.models.unet import UNetConfig, embed_time
from freeanimate_jax.models.unet_blocks import TimestepEmbedding

Array = jax.Array

# The UNet config keys diffusers' `ControlNetModel.from_unet` carries over to the ControlNet.
_FROM_UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim")
# What from_unet copies from the UNet; the rest starts as a new ControlNet does.
_COPIED = ("conv_in", "time_embedding", "down_blocks", "mid_block")


def config_from_unet(unet_config: Mapping, *,
                     conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                     conditioning_channels: int = 3) -> dict:
    """A ControlNetModel config for a UNet, as diffusers' `ControlNetModel.from_unet` makes it."""
    config = {k: unet_config[k] for k in _FROM_UNET_KEYS if k in unet_config}
    config.update(_class_name="ControlNetModel",
                  conditioning_embedding_out_channels=list(conditioning_embedding_out_channels),
                  conditioning_channels=conditioning_channels)
    return config


class ControlNetConditioningEmbedding(nnx.Module):
    """Pixel-space condition image -> latent-resolution features (3 stride-2 convs for SD)."""

    def __init__(self, out_ch: int, channels: Sequence[int], cond_ch: int = 3, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.conv_in = Conv2d(cond_ch, channels[0], 3, padding=1, **kw)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks.append(Conv2d(c_in, c_in, 3, padding=1, **kw))
            blocks.append(Conv2d(c_in, c_out, 3, padding=1, stride=2, **kw))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv2d(channels[-1], out_ch, 3, padding=1, **kw)

    def __call__(self, cond_nhwc: Array) -> Array:
        x = silu(self.conv_in(cond_nhwc))
        for conv in self.blocks:
            x = silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(nnx.Module):
    """`controlnet(sample, timestep, encoder_hidden_states, controlnet_cond)`
    -> (down residuals, mid residual), all NHWC."""

    def __init__(self, cfg: UNetConfig, cond_channels: Sequence[int], cond_in: int = 3, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        ch = cfg.block_out_channels
        a = cfg.block_args(rngs, param_dtype)
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4, cfg.act_fn, **kw)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cond_channels, cond_in, **kw)
        self.down_blocks = cfg.down_blocks(a)
        # One zero conv per UNet skip connection: conv_in, each resnet, each downsampler.
        zero_ch = [ch[0]]
        for i, c in enumerate(ch):
            zero_ch += [c] * cfg.layers_per_block + ([c] if i < len(ch) - 1 else [])
        self.controlnet_down_blocks = nnx.List([Conv2d(c, c, 1, **kw) for c in zero_ch])
        self.mid_block = cfg.mid(a)
        self.controlnet_mid_block = Conv2d(ch[-1], ch[-1], 1, **kw)
        name_attention_layers(self)

    @classmethod
    def from_config(cls, config: Mapping, *, rngs: nnx.Rngs,
                    param_dtype=jnp.float32) -> ControlNetModel:
        return cls(UNetConfig.from_dict(config),
                   tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                   config.get("conditioning_channels", 3), rngs=rngs, param_dtype=param_dtype)

    @classmethod
    def from_unet(cls, unet: nnx.Module, config: Mapping, *, rngs: nnx.Rngs,
                  param_dtype=jnp.float32) -> ControlNetModel:
        """A new ControlNet for `unet` (diffusers' `from_unet`, the start of ControlNet
        training): the UNet's input conv, time embedding, down and mid blocks copied; the zero
        convs and the condition embedding's last conv zero, so it adds nothing at first."""
        net = cls.from_config(config, rngs=rngs, param_dtype=param_dtype)
        for name in _COPIED:
            src = nnx.state(getattr(unet, name), nnx.Param)
            # Copies, not shared buffers: the ControlNet trains while the UNet stays frozen.
            copies = jax.tree.map(lambda x: jnp.array(x, dtype=param_dtype, copy=True), src)
            nnx.update(getattr(net, name), copies)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block,
                     net.controlnet_cond_embedding.conv_out]:
            nnx.update(conv, jax.tree.map(jnp.zeros_like, nnx.state(conv, nnx.Param)))
        return net

    def __call__(self, sample: Array, timestep: Array, encoder_hidden_states: Array,
                 controlnet_cond: Array, conditioning_scale: float | Array = 1.0,
                 guess_mode: bool = False, attn: AttnControl | None = None):
        """Residuals for the UNet; `controlnet_cond` is the condition image in [0, 1], NHWC at
        8x the latent size. Captures requested through `attn` land in `attn.captured`."""
        dtype = sample.dtype
        context = encoder_hidden_states.astype(dtype)
        temb = embed_time(self, self.cfg, timestep, sample.shape[0], dtype)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, attn)
            skips += s
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context, attn)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode:
            # diffusers: logspace(-1, 0) weights, deepest residual strongest.
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1) * conditioning_scale
        else:
            scales = jnp.full((len(down) + 1,), 1.0) * conditioning_scale
        down = [s * scales[i].astype(dtype) for i, s in enumerate(down)]
        mid = mid * scales[-1].astype(dtype)
        return down, mid
