"""UNet2DConditionModel (SD 1.x / 2.x) in Flax NNX, channels-last, diffusers parameter names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from freeanimate_jax.models.attention import AttnControl, name_attention_layers
from freeanimate_jax.models.layers import Conv2d, GroupNorm, activation
from freeanimate_jax.models.unet_blocks import (
    BlockArgs,
    DownBlock,
    MidBlock,
    TimestepEmbedding,
    UpBlock,
    timestep_embedding,
)

Array = jax.Array

# Config values whose non-default setting changes the architecture in ways we do not build.
_UNSUPPORTED = {
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "time_cond_proj_dim": None, "timestep_post_act": None, "dual_cross_attention": False,
    "only_cross_attention": False, "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "attention_type": "default",
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "num_class_embeds": None,
    "mid_block_only_cross_attention": None, "reverse_transformer_layers_per_block": None,
    "projection_class_embeddings_input_dim": None, "addition_time_embed_dim": None,
    "global_pool_conditions": False, "controlnet_conditioning_channel_order": "rgb",
}
# Training's per-block rematerialisation (`remat_policy`); jax.checkpoint's policy None = save
# nothing.
REMAT_POLICIES = {"full": None,
                  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"config {name}: {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture a diffusers UNet/ControlNet `config.json` describes, resolved."""

    in_channels: int
    block_out_channels: tuple[int, ...]
    down_attn: tuple[bool, ...]
    heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    norm_num_groups: int
    norm_eps: float
    act_fn: str
    use_linear_projection: bool
    flip_sin_to_cos: bool
    freq_shift: float
    mid_block: bool

    @classmethod
    def from_dict(cls, c: Mapping) -> UNetConfig:
        for key, default in _UNSUPPORTED.items():
            if c.get(key, default) != default:
                raise ValueError(f"config {key}={c[key]!r} is not supported (expected "
                                 f"{default!r}: SD 1.x/2.x UNets)")
        down = tuple(c.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        for t in down:
            if t not in _DOWN_TYPES:
                raise ValueError(f"config down_block_types: {t!r} not supported; expected "
                                 f"{sorted(_DOWN_TYPES)}")
        mid_type = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(f"config mid_block_type {mid_type!r} not supported")
        n = len(down)
        # diffusers' historical naming: `attention_head_dim` is the number of heads unless
        # `num_attention_heads` is given (SD 1.5: 8 heads; SD 2: [5, 10, 20, 20]).
        heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
        cross = c.get("cross_attention_dim", 1280)
        if not isinstance(cross, int):
            raise ValueError("config cross_attention_dim must be one integer for SD 1.x/2.x")
        lpb = c.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise ValueError("config layers_per_block must be one integer for SD 1.x/2.x")
        return cls(
            in_channels=c.get("in_channels", 4),
            block_out_channels=tuple(c.get("block_out_channels", (320, 640, 1280, 1280))),
            down_attn=tuple(_DOWN_TYPES[t] for t in down),
            heads=_per_block(heads, n, "num_attention_heads"),
            transformer_layers=_per_block(c.get("transformer_layers_per_block", 1), n,
                                          "transformer_layers_per_block"),
            layers_per_block=lpb, cross_attention_dim=cross,
            norm_num_groups=c.get("norm_num_groups", 32), norm_eps=c.get("norm_eps", 1e-5),
            act_fn=c.get("act_fn", "silu"),
            use_linear_projection=c.get("use_linear_projection", False),
            flip_sin_to_cos=c.get("flip_sin_to_cos", True), freq_shift=c.get("freq_shift", 0),
            mid_block=mid_type is not None)

    def block_args(self, rngs: nnx.Rngs, param_dtype) -> BlockArgs:
        return BlockArgs(temb_ch=self.block_out_channels[0] * 4, groups=self.norm_num_groups,
                         eps=self.norm_eps, act_fn=self.act_fn,
                         cross_dim=self.cross_attention_dim,
                         use_linear_projection=self.use_linear_projection, rngs=rngs,
                         param_dtype=param_dtype)

    def down_blocks(self, a: BlockArgs) -> nnx.List:
        blocks, ch = [], self.block_out_channels
        for i, out_ch in enumerate(ch):
            blocks.append(DownBlock(
                a, ch[max(i - 1, 0)], out_ch, num_layers=self.layers_per_block,
                heads=self.heads[i] if self.down_attn[i] else None,
                transformer_layers=self.transformer_layers[i], add_downsample=i < len(ch) - 1))
        return nnx.List(blocks)

    def mid(self, a: BlockArgs) -> MidBlock | None:
        if not self.mid_block:
            return None
        return MidBlock(a, self.block_out_channels[-1], heads=self.heads[-1],
                        transformer_layers=self.transformer_layers[-1])


def embed_time(model: nnx.Module, cfg: UNetConfig, timestep: Array, batch: int,
               dtype) -> Array:
    """Sinusoidal timestep features through the model's MLP (UNet and ControlNet alike)."""
    t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (batch,))
    emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                             freq_shift=cfg.freq_shift)
    return model.time_embedding(emb.astype(dtype))


class UNet2DConditionModel(nnx.Module):
    """`unet(sample, timestep, encoder_hidden_states, ...)` -> noise prediction (NHWC)."""

    def __init__(self, cfg: UNetConfig, out_channels: int, up_attn: tuple[bool, ...], *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg, self.out_channels, self.up_attn = cfg, out_channels, up_attn
        ch = cfg.block_out_channels
        a = cfg.block_args(rngs, param_dtype)
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4, cfg.act_fn, **kw)
        self.down_blocks = cfg.down_blocks(a)
        self.mid_block = cfg.mid(a)
        rev_ch, rev_heads = ch[::-1], cfg.heads[::-1]
        rev_layers = cfg.transformer_layers[::-1]
        ups, prev = [], rev_ch[0]
        for i, out_ch in enumerate(rev_ch):
            ups.append(UpBlock(
                a, rev_ch[min(i + 1, len(ch) - 1)], prev, out_ch,
                num_layers=cfg.layers_per_block + 1, heads=rev_heads[i] if up_attn[i] else None,
                transformer_layers=rev_layers[i], add_upsample=i < len(ch) - 1))
            prev = out_ch
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps,
                                       param_dtype=param_dtype)
        self.act = activation(cfg.act_fn)
        self.conv_out = Conv2d(ch[0], out_channels, 3, padding=1, **kw)
        name_attention_layers(self)

    @property
    def has_motion(self) -> bool:
        """Whether motion modules are inserted (then frames go in as a video)."""
        return any(getattr(b, "motion_modules", None) is not None
                   for b in (*self.down_blocks, *self.up_blocks))

    def _checkpointed(self, call):
        """`call(block, *arrays)`, or its rematerialised form when `remat_policy` (a static
        training option) asks each block to recompute its activations in the backward pass:
        "full" saves nothing, "dots_no_batch" keeps the matmuls without batch dimensions."""
        mode = getattr(self, "remat_policy", "none")
        if mode == "none":
            return call
        if mode not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={mode!r}; expected none or {', '.join(REMAT_POLICIES)}")
        return nnx.remat(call, policy=REMAT_POLICIES[mode])

    @classmethod
    def from_config(cls, config: Mapping, *, rngs: nnx.Rngs,
                    param_dtype=jnp.float32) -> UNet2DConditionModel:
        cfg = UNetConfig.from_dict(config)
        up = tuple(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        for t in up:
            if t not in _UP_TYPES:
                raise ValueError(f"config up_block_types: {t!r} not supported; expected "
                                 f"{sorted(_UP_TYPES)}")
        if len(up) != len(cfg.block_out_channels):
            raise ValueError("config up_block_types and block_out_channels differ in length")
        return cls(cfg, config.get("out_channels", 4), tuple(_UP_TYPES[t] for t in up),
                   rngs=rngs, param_dtype=param_dtype)

    def __call__(self, sample: Array, timestep: Array, encoder_hidden_states: Array,
                 down_block_additional_residuals: Sequence[Array] | None = None,
                 mid_block_additional_residual: Array | None = None,
                 attn: AttnControl | None = None):
        """Noise prediction for NHWC `sample`, or for a video (B, F, H, W, C) when motion
        modules are inserted (timestep and text per video; ControlNet residuals per frame, as
        (B*F, ...) or (B, F, ...)). Captures requested through `attn` land in
        `attn.captured`."""
        dtype, frames = sample.dtype, None
        context = encoder_hidden_states.astype(dtype)
        temb = embed_time(self, self.cfg, timestep, sample.shape[0], dtype)
        if sample.ndim == 5:
            frames = sample.shape[1]
            sample = rearrange(sample, "b f h w c -> (b f) h w c")
            temb = jnp.repeat(temb, frames, axis=0)
            if context.shape[0] != sample.shape[0]:
                context = jnp.repeat(context, frames, axis=0)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = self._checkpointed(lambda b, x, t, c: b(x, t, c, attn, frames))(
                block, x, temb, context)
            skips += s
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} ControlNet down "
                                 f"residuals for {len(skips)} UNet skip connections")
            skips = [s + r.reshape(s.shape).astype(dtype) for s, r in
                     zip(skips, down_block_additional_residuals, strict=True)]
        if self.mid_block is not None:
            x = self._checkpointed(lambda b, x, t, c: b(x, t, c, attn, frames))(
                self.mid_block, x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.reshape(x.shape).astype(dtype)
        for block in self.up_blocks:
            mine = skips[-len(block.resnets):]
            skips = skips[:-len(block.resnets)]
            size = skips[-1].shape[1:3] if skips else None
            # `size` is closed over, not a default argument: remat would trace a default. The
            # lambda runs within this iteration, so the late binding B023 warns of cannot bite.
            x = self._checkpointed(
                lambda b, x, m, t, c: b(x, m, t, c, attn, upsample_size=size,  # noqa: B023
                                        frames=frames))(block, x, mine, temb, context)
        x = self.conv_out(self.act(self.conv_norm_out(x)))
        if frames:
            x = rearrange(x, "(b f) h w c -> b f h w c", f=frames)
        return x
