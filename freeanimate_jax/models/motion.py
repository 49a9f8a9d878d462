"""AnimateDiff motion modules: the temporal transformer, the adapter, and its insertion.

One module serves every released version through switches: position-table length (24 for v1,
32 for v2/v3), a mid-block module (v2), GroupNorm statistics per frame (the original AnimateDiff
code) or across frames (diffusers), across-frame resnet norms in the UNet (v1), and a
zero-initialised `proj_out` for new modules (the paper; diffusers' MotionAdapter does not).
Parameter paths equal diffusers' MotionAdapter / UNetMotionModel keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from freeanimate_jax.models.attention import DEFAULT_RUNTIME, AttnControl, name_attention_layers
from freeanimate_jax.models.layers import GroupNorm, Linear
from freeanimate_jax.models.unet import UNet2DConditionModel
from freeanimate_jax.models.unet_blocks import BasicTransformerBlock

Array = jax.Array


class MotionModule(nnx.Module):
    """diffusers' AnimateDiffTransformer3D: tokens attend over frames only,
    (b f)(h w) c -> (b h w) f c, with a residual around the whole module."""

    def __init__(self, channels: int, heads: int, *, layers: int = 1, groups: int = 32,
                 positions: int = 32, norm_per_frame: bool = False, zero_out: bool = False,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm = GroupNorm(groups, channels, eps=1e-6, param_dtype=param_dtype)
        self.proj_in = Linear(channels, channels, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, None, positions=positions,
                                  **kw) for _ in range(layers)])
        self.proj_out = Linear(channels, channels, **kw)
        if zero_out:
            self.proj_out.weight.set_value(jnp.zeros_like(self.proj_out.weight[...]))
            self.proj_out.bias.set_value(jnp.zeros_like(self.proj_out.bias[...]))
        self.norm_per_frame = norm_per_frame

    def __call__(self, x: Array, frames: int, ctrl: AttnControl | None = None) -> Array:
        """`x` is a video batch ((b f), h, w, c). Temporal attention needs every frame of a
        pixel on one device: the tokens are named `temporal_tokens` going in and `frames`
        coming out, and on a frame-sharded mesh the layout's rules turn that into one
        all-to-all each way."""
        runtime = ctrl.runtime if ctrl is not None else DEFAULT_RUNTIME
        h_, w_ = x.shape[1:3]
        if self.norm_per_frame:
            h = self.norm(x)
        else:
            h = rearrange(self.norm(rearrange(x, "(b f) h w c -> b (f h) w c", f=frames)),
                          "b (f h) w c -> (b f) h w c", f=frames)
        h = runtime.constrain(rearrange(h, "(b f) h w c -> (b h w) f c", f=frames),
                              ("temporal_tokens", None, None))
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, None, ctrl)
        h = self.proj_out(h)
        h = runtime.constrain(rearrange(h, "(b h w) f c -> (b f) h w c", h=h_, w=w_),
                              ("frames", None, None, None))
        return h + x


class MotionModules(nnx.Module):
    """A container so paths read `down_blocks.i.motion_modules.j` as in diffusers."""

    def __init__(self, modules: Sequence[MotionModule]):
        self.motion_modules = nnx.List(list(modules))


# diffusers has no key for the GroupNorm mode (its UNetMotionModel normalises across frames);
# a private key records it in exported configs (diffusers ignores `_`-prefixed keys).
NORM_KEY = "_norm_per_frame"


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """A diffusers MotionAdapter config, resolved, plus the switches diffusers has no key for."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    mid_layers: int = 1
    heads: tuple[int, ...] = (8, 8, 8, 8)
    groups: int = 32
    max_seq_length: int = 32
    mid_block: bool = True
    norm_per_frame: bool = False  # True for the original AnimateDiff SD1.5 checkpoints
    resnet_norm_across_frames: bool = False  # True for v1

    @classmethod
    def from_dict(cls, c: Mapping, **switches) -> MotionConfig:
        if c.get("conv_in_channels"):
            raise ValueError("motion adapter conv_in_channels (SparseCtrl-style input) is not "
                             "supported")
        ch = tuple(c.get("block_out_channels", cls.block_out_channels))

        def per_block(key: str, default: int) -> tuple[int, ...]:
            v = c.get(key, default)
            v = tuple(v) if isinstance(v, Sequence) else (v,) * len(ch)
            if len(v) != len(ch) or not all(isinstance(i, int) for i in v):
                raise ValueError(f"motion adapter config {key}={c.get(key)!r}: expected one "
                                 f"integer per block ({len(ch)})")
            return v

        mid_t = c.get("motion_transformer_layers_per_mid_block", 1)
        if not isinstance(mid_t, int):
            raise ValueError("motion_transformer_layers_per_mid_block must be one integer")
        if c.get("motion_mid_block_layers_per_block", 1) != 1 or mid_t != 1:
            raise ValueError("motion mid blocks with more than one module are not supported")
        return cls(block_out_channels=ch,
                   layers_per_block=per_block("motion_layers_per_block", 2),
                   transformer_layers=per_block("motion_transformer_layers_per_block", 1),
                   heads=per_block("motion_num_attention_heads", 8),
                   groups=c.get("motion_norm_num_groups", 32),
                   max_seq_length=c.get("motion_max_seq_length", 32),
                   mid_block=c.get("use_motion_mid_block", True),
                   **{"norm_per_frame": bool(c.get(NORM_KEY, False)), **switches})

    def to_diffusers(self) -> dict:
        return {"_class_name": "MotionAdapter", "block_out_channels": list(self.block_out_channels),
                "motion_layers_per_block": list(self.layers_per_block),
                "motion_transformer_layers_per_block": list(self.transformer_layers),
                "motion_mid_block_layers_per_block": 1,
                "motion_transformer_layers_per_mid_block": 1,
                "motion_num_attention_heads": list(self.heads),
                "motion_norm_num_groups": self.groups,
                "motion_max_seq_length": self.max_seq_length,
                "use_motion_mid_block": self.mid_block, "conv_in_channels": None,
                NORM_KEY: self.norm_per_frame}


class MotionAdapter(nnx.Module):
    """All motion modules of one AnimateDiff release, laid out like diffusers' MotionAdapter."""

    def __init__(self, cfg: MotionConfig, *, zero_out: bool = False, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.cfg = cfg

        def stack(ch: int, heads: int, n: int, layers: int) -> MotionModules:
            return MotionModules([MotionModule(
                ch, heads, layers=layers, groups=cfg.groups, positions=cfg.max_seq_length,
                norm_per_frame=cfg.norm_per_frame, zero_out=zero_out, rngs=rngs,
                param_dtype=param_dtype) for _ in range(n)])

        ch, heads = cfg.block_out_channels, cfg.heads
        self.down_blocks = nnx.List([stack(c, heads[i], cfg.layers_per_block[i],
                                           cfg.transformer_layers[i]) for i, c in enumerate(ch)])
        self.mid_block = stack(ch[-1], heads[-1], 1, 1) if cfg.mid_block else None
        self.up_blocks = nnx.List([
            stack(c, heads[::-1][i], cfg.layers_per_block[::-1][i] + 1,
                  cfg.transformer_layers[::-1][i]) for i, c in enumerate(ch[::-1])])
        name_attention_layers(self)

    @staticmethod
    def torch_key(key: str) -> str | None:
        # The sinusoidal tables are fixed buffers, recomputed here rather than loaded.
        return None if key.endswith(("pos_embed.pe", "pos_encoder.pe")) else key

    @classmethod
    def from_config(cls, config: Mapping, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                    **switches) -> MotionAdapter:
        return cls(MotionConfig.from_dict(config, **switches), rngs=rngs,
                   param_dtype=param_dtype)


class UNetMotionModel(UNet2DConditionModel):
    """A UNet2DConditionModel with motion modules inserted: the same code, video in and out."""

    @classmethod
    def from_unet2d(cls, unet: UNet2DConditionModel, motion_adapter: MotionAdapter
                    ) -> UNetMotionModel:
        """Insert the adapter's modules into a (personalised) SD UNet. Weights are shared with
        `unet` and `motion_adapter`, not copied."""
        cfg, m = unet.cfg, motion_adapter.cfg
        problems = []
        if tuple(cfg.block_out_channels) != tuple(m.block_out_channels):
            problems.append(f"channels {cfg.block_out_channels} vs {m.block_out_channels}")
        if any(n != cfg.layers_per_block for n in m.layers_per_block):
            problems.append(f"layers per block {cfg.layers_per_block} vs {m.layers_per_block}")
        if m.mid_block and unet.mid_block is None:
            problems.append("the adapter has a mid-block module, the UNet no mid block")
        if problems:
            raise ValueError("motion module does not fit this UNet: " + "; ".join(problems))
        param_dtype = jax.tree.leaves(nnx.state(unet, nnx.Param))[0].dtype
        video = nnx.eval_shape(lambda: cls(cfg, unet.out_channels, unet.up_attn,
                                           rngs=nnx.Rngs(0), param_dtype=param_dtype))
        nnx.update(video, nnx.state(unet))
        for ours, theirs in zip(video.down_blocks, motion_adapter.down_blocks, strict=True):
            ours.motion_modules = nnx.data(theirs.motion_modules)
        if motion_adapter.mid_block is not None:
            video.mid_block.motion_modules = nnx.data(motion_adapter.mid_block.motion_modules)
        for ours, theirs in zip(video.up_blocks, motion_adapter.up_blocks, strict=True):
            ours.motion_modules = nnx.data(theirs.motion_modules)
        for _, node in nnx.iter_graph(video):
            if hasattr(node, "norm_across_frames"):
                node.norm_across_frames = m.resnet_norm_across_frames
        name_attention_layers(video)
        return video


def position_limit(unet: nnx.Module) -> int | None:
    """The most frames the motion modules' position tables hold (None: no motion modules).
    The UNet itself refuses longer videos only while tracing: check this first."""
    tables = {n.positions for _, n in nnx.iter_graph(unet) if getattr(n, "positions", None)}
    return min(tables) if tables else None
