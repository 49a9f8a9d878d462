"""What trains: the model to train, the name-pattern filter that picks its trained parameters,
the optimizer, and the train state (trained parameters, optimizer state, EMA, step).

The filter is one `nnx` filter used for the split that the gradient is taken over, for the
optimizer state and for the checkpoint alike: frozen parameters are never differentiated,
never given optimizer state and never saved (levanter's `is_trainable`, big_vision's frozen
schedule without the masking).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from freeanimate_jax.config import NEW_CONTROLNET
from freeanimate_jax.train.settings import LoopConfig, OptimConfig

_POSITIONS = {"v1": 24, "v2": 32, "v3": 32}
NEW = NEW_CONTROLNET  # `controlnet: new`: a ControlNet made from the base UNet


class ControlledUNet(nnx.Module):
    """A UNet and a ControlNet as one module, so one name filter picks what trains in either
    (`controlnet` trains the ControlNet with the UNet frozen)."""

    def __init__(self, unet: nnx.Module, controlnet: nnx.Module):
        self.unet, self.controlnet = unet, controlnet


def path_name(path: tuple) -> str:
    """A pytree path as a dotted parameter name (a Variable's own `value` step dropped, so an
    nnx State, its pure-dict form and orbax's target-free restore of it name a leaf alike; no
    parameter of ours is called `value`)."""
    if path and getattr(path[-1], "key", None) == "value":
        path = path[:-1]
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
            continue
        parts.append(str(getattr(k, "key", getattr(k, "idx", k))))
    return ".".join(parts)


def trainable_filter(pattern: str) -> Any:
    """Params whose dotted path contains a match of the regex `pattern`."""
    regex = re.compile(pattern)
    return nnx.All(nnx.Param, lambda path, _: regex.search(path_name(path)) is not None)


def split(model: nnx.Module, pattern: str) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, trained params, everything else); ConfigError when `pattern` picks nothing."""
    from freeanimate_jax.config import ConfigError

    graphdef, trained, frozen = nnx.split(model, trainable_filter(pattern), ...)
    if not jax.tree.leaves(trained):
        raise ConfigError(f"train.trainable={pattern!r} matches no parameter; expected a regex "
                         f"found in parameter paths such as 'motion_modules' or "
                         f"'up_blocks\\.3\\.attentions'")
    return graphdef, trained, frozen


def new_adapter_config(unet_config: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """A diffusers MotionAdapter config fitting `unet_config` in the released `layout`: v1 (24
    positions, no mid block), v2 (32, mid block), v3 (32, no mid block); 8 heads, the UNet's
    GroupNorm groups, one module per resnet."""
    ch = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    return {"_class_name": "MotionAdapter", "block_out_channels": ch,
            "motion_layers_per_block": layers, "motion_mid_block_layers_per_block": 1,
            "motion_num_attention_heads": 8,
            "motion_norm_num_groups": unet_config.get("norm_num_groups", 32),
            "motion_max_seq_length": _POSITIONS[layout], "use_motion_mid_block": layout == "v2",
            "conv_in_channels": None}


def new_adapter(unet_config: Mapping[str, Any], layout: str, *, norm_per_frame: bool,
                seed: int = 0, dtype=jnp.float32) -> nnx.Module:
    """A new motion adapter for a UNet, `proj_out` zero-initialised (the AnimateDiff paper):
    inserted, it leaves the image model's outputs unchanged."""
    from freeanimate_jax.models.motion import MotionAdapter, MotionConfig
    from freeanimate_jax.weights.loader import FrozenConfig

    config = new_adapter_config(unet_config, layout)
    cfg = MotionConfig.from_dict(config, norm_per_frame=norm_per_frame)
    adapter = MotionAdapter(cfg, zero_out=True, rngs=nnx.Rngs(seed), param_dtype=dtype)
    adapter.config = FrozenConfig(config)
    return adapter


def new_controlnet(unet: nnx.Module, *, seed: int = 0, dtype=jnp.float32,
                   downscale: int = 8) -> nnx.Module:
    """A ControlNet for `unet` as diffusers' train_controlnet.py starts one (`from_unet`: the
    encoder copied, zero convs zero), RGB condition images at the image size. `downscale`: the
    VAE's factor; its condition embedding halves the image log2(downscale) times (SD's 8x:
    diffusers' default channels 16, 32, 96, 256; a 4x VAE keeps the first three)."""
    from freeanimate_jax.models.controlnet import ControlNetModel, config_from_unet
    from freeanimate_jax.weights.loader import FrozenConfig

    halvings = int(downscale).bit_length() - 1
    if downscale < 1 or 2**halvings != downscale or halvings > 3:
        raise ValueError(f"VAE downscale {downscale}; expected 1, 2, 4 or 8")
    config = config_from_unet(
        unet.config, conditioning_embedding_out_channels=(16, 32, 96, 256)[:halvings + 1])
    net = ControlNetModel.from_unet(unet, config, rngs=nnx.Rngs(seed), param_dtype=dtype)
    net.config = FrozenConfig(config)
    return net


def learning_rate(optim: OptimConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, cosine or linear decay to lr x end_lr_factor."""
    decay = optim.decay_steps or max(1, max_steps - optim.warmup_steps)
    end = optim.lr * optim.end_lr_factor
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps,
                                                  optim.warmup_steps + decay, end)
    after = (optax.constant_schedule(optim.lr) if optim.schedule == "constant"
             else optax.linear_schedule(optim.lr, end, decay))
    if not optim.warmup_steps:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), after], [optim.warmup_steps])


def optimizer(optim: OptimConfig, max_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on every trained parameter, as torch's AdamW
    over a parameter list)."""
    adamw = optax.adamw(learning_rate(optim, max_steps), b1=optim.b1, b2=optim.b2,
                        eps=optim.eps, weight_decay=optim.weight_decay)
    if not optim.grad_clip:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)


def init_state(trained: nnx.State, tx: optax.GradientTransformation, optim: OptimConfig
               ) -> dict[str, Any]:
    """The train state: fp32 trained params, their optimizer state (and EMA), the step."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trained)
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if optim.ema_decay is not None:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def state_bytes(n_trained: int, optim: OptimConfig) -> int:
    """Bytes per chip of a replicated train state: fp32 weights, AdamW's two moments, the EMA
    and the gradients of `n_trained` parameters (what `state_sharding=data` divides)."""
    copies = 1 + 2 + (optim.ema_decay is not None) + 1
    return 4 * copies * n_trained


def shard_state(loop: LoopConfig, optim: OptimConfig, n_trained: int, data_size: int,
                chip_bytes: int | None) -> bool:
    """`train.state_sharding`: shard over `data` (True) or replicate. `auto` shards when there is
    more than one data shard and the replicated state would take over a quarter of a chip's
    memory; unknown memory (the CPU) replicates."""
    if loop.state_sharding != "auto":
        return loop.state_sharding == "data"
    if data_size < 2 or not chip_bytes:
        return False
    return state_bytes(n_trained, optim) > chip_bytes / 4


def set_remat(model: nnx.Module, loop: LoopConfig) -> None:
    """Recompute each UNet block's activations in the backward pass per `train.remat`."""
    model.remat_policy = loop.remat
