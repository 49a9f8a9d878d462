"""transformers' `CLIPTextModel` (the Stable Diffusion text encoder) in Flax NNX.

Parameter paths equal transformers 5's state-dict keys (which have no `text_model.` prefix);
`torch_key` also accepts hub checkpoints written by older transformers, whose keys carry that
prefix and an `embeddings.position_ids` buffer. Output: the last hidden state after
`final_layer_norm`, what Stable Diffusion's UNet cross-attends to. Only the causal mask is applied:
diffusers passes no padding mask to SD's CLIP, so padded tokens attend like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax.models.attention import dot_product_attention
from freeanimate_jax.models.layers import ACTIVATIONS, Embedding, LayerNorm, Linear

Array = jax.Array

# transformers' CLIPTextConfig defaults, used for keys a config.json leaves out (as transformers
# itself does when it builds the config from that file).
CONFIG_DEFAULTS: dict[str, object] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
# Only the activations CLIP checkpoints use and the parity tests cover; transformers' "gelu" is
# the exact erf form, as is ours.
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding at positions 0..L-1."""

    def __init__(self, vocab_size: int, max_positions: int, dim: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.token_embedding = Embedding(vocab_size, dim, rngs=rngs, param_dtype=param_dtype)
        self.position_embedding = Embedding(max_positions, dim, rngs=rngs,
                                            param_dtype=param_dtype)

    def __call__(self, input_ids: Array) -> Array:
        length, max_len = input_ids.shape[-1], self.position_embedding.weight.shape[0]
        if length > max_len:
            raise ValueError(f"CLIP text: sequence length {length} exceeds "
                             f"max_position_embeddings {max_len}; truncate when tokenizing")
        dtype = self.token_embedding.weight.dtype
        tokens = self.token_embedding(input_ids).astype(dtype)
        return tokens + self.position_embedding(jnp.arange(length)).astype(dtype)


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.q_proj, self.k_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)
        self.v_proj, self.out_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)

    def __call__(self, x: Array) -> Array:
        out = dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                    causal=True, scale=self.scale)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.act = act  # a name, not a function: keeps the module's static structure hashable
        self.fc1 = Linear(dim, hidden, rngs=rngs, param_dtype=param_dtype)
        self.fc2 = Linear(hidden, dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.self_attn = CLIPAttention(dim, heads, rngs=rngs, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(dim, eps=eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(dim, hidden, act, rngs=rngs, param_dtype=param_dtype)
        self.layer_norm2 = LayerNorm(dim, eps=eps, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, layers: Sequence[CLIPEncoderLayer]):
        self.layers = nnx.List(layers)


class CLIPTextModel(nnx.Module):
    """CLIP's text transformer; `__call__` returns transformers' `last_hidden_state`."""

    def __init__(self, *, vocab_size: int, hidden_size: int, intermediate_size: int,
                 num_hidden_layers: int, num_attention_heads: int, max_position_embeddings: int,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"CLIPTextModel: unsupported hidden_act {hidden_act!r}; expected one "
                             f"of {SUPPORTED_ACTIVATIONS}")
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size),
                            ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads),
                            ("max_position_embeddings", max_position_embeddings)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextModel: {name} must be a positive integer, got "
                                 f"{value!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"CLIPTextModel: hidden_size {hidden_size} is not divisible by "
                             f"num_attention_heads {num_attention_heads}")
        if not isinstance(layer_norm_eps, int | float) or not layer_norm_eps > 0:
            raise ValueError(f"CLIPTextModel: layer_norm_eps must be a positive number, got "
                             f"{layer_norm_eps!r}")
        eps = float(layer_norm_eps)
        self.embeddings = CLIPTextEmbeddings(vocab_size, max_position_embeddings, hidden_size,
                                             rngs=rngs, param_dtype=param_dtype)
        self.encoder = CLIPEncoder([
            CLIPEncoderLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act, eps,
                             rngs=rngs, param_dtype=param_dtype)
            for _ in range(num_hidden_layers)])
        self.final_layer_norm = LayerNorm(hidden_size, eps=eps, param_dtype=param_dtype)

    @classmethod
    def from_config(cls, config: Mapping, *, rngs: nnx.Rngs,
                    param_dtype=jnp.float32) -> CLIPTextModel:
        """Build from a transformers `config.json` dict (missing keys: transformers' defaults)."""
        kwargs = {key: config.get(key, default) for key, default in CONFIG_DEFAULTS.items()}
        return cls(**kwargs, rngs=rngs, param_dtype=param_dtype)

    @staticmethod
    def torch_key(key: str) -> str | None:
        """Checkpoint key -> our path. Hub checkpoints (e.g. SD1.5's text_encoder, written by
        transformers 4) prefix `text_model.` and store the constant `position_ids` buffer, which
        we recompute and so drop."""
        key = key.removeprefix("text_model.")
        return None if key == "embeddings.position_ids" else key

    def __call__(self, input_ids: Array, *, clip_skip: int | None = None,
                 output_hidden_states: bool = False) -> Array | tuple[Array, tuple[Array, ...]]:
        """Token ids (B, L), L <= max_position_embeddings -> hidden states (B, L, D).

        `clip_skip=k` follows diffusers' `encode_prompt`: the hidden state k layers before the
        last (`hidden_states[-(k + 1)]`) through `final_layer_norm`; 0 or None is the plain
        output. With `output_hidden_states=True` returns `(output, hidden_states)` where
        `hidden_states` is transformers' tuple: the embeddings, then each layer's output, none
        normalised. Computes in the parameter dtype.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextModel: input_ids must be (batch, length), got shape "
                             f"{input_ids.shape}")
        n_layers = len(self.encoder.layers)
        skip = 0 if clip_skip is None else clip_skip
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= n_layers:
            raise ValueError(f"CLIPTextModel: clip_skip must be an int in [0, {n_layers}], got "
                             f"{clip_skip!r}")
        # Layers after the selected one cannot change the output: run them only when asked for.
        n_run = n_layers if output_hidden_states else n_layers - skip
        h = self.embeddings(input_ids)
        hidden = [h]
        for i in range(n_run):
            h = self.encoder.layers[i](h)
            hidden.append(h)
        out = self.final_layer_norm(hidden[n_layers - skip])
        return (out, tuple(hidden)) if output_hidden_states else out


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Prompts -> int32 ids (B, max_length) as diffusers' `encode_prompt` makes them.

    Pads every prompt to `max_length` (default: the tokenizer's `model_max_length`, 77 for
    CLIP) and truncates longer ones, keeping the end-of-text token last. A fixed length keeps
    the encoder's compiled shape fixed and matches the 77 tokens SD was trained with.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    length = tokenizer.model_max_length if max_length is None else max_length
    if not isinstance(length, int) or not 0 < length <= 100_000:
        raise ValueError(f"tokenize: max_length {length!r} is not a usable length (a tokenizer "
                         f"saved without model_max_length? pass max_length=77)")
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="np").input_ids
    return np.asarray(ids, dtype=np.int32)
