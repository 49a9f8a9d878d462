"""The one attention function every attention layer calls, and the `attn` contract.

Contract (see DESIGN.md): a model forward may receive an `AttnControl`. Its `inputs` map layer
paths (e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn1``) to `LayerInputs`, what
each layer should use instead of or beside its own inputs:

- ``anchor``: RA-SA. Extra key/value input appended to the layer's own tokens:
  ``K = W_k [h ; h_ref]``, ``V = W_v [h ; h_ref]``. Shape (B or 1, L_ref, C).
- ``hidden``: IBA cache in ``hidden`` form: the layer's attention input at the same step of the
  inversion, ``h_pre``. Queries and keys come from it (``Q_pre = W_q h_pre``,
  ``K_pre = W_k [h_pre ; anchor]``); values come from the current input.
- ``maps``: IBA cache in ``maps`` form: the inversion's softmax maps (B, heads, Lq, Lk),
  applied to the current values. Tiny shapes only: memory is O(L^2).
- ``anchor_on`` / ``iba_on``: optional traced booleans switching the anchor / the IBA cache
  on or off for this call, so one scan body serves steps with and without them. A gated-off
  anchor is replaced by the keys' own source (attention over ``[h ; h]`` equals attention over
  ``h``: duplicated keys leave the softmax unchanged), so shapes never change.

and static policy: which layers capture their attention input (``hidden``), their softmax maps
(``maps``) or their projected output (``output``), and an optional in-batch anchor
(``anchor_index[b]`` = the batch element whose own input anchors element b). Captures are
collected in `AttnControl.captured`, ``{path: {kind: array}}``, which the caller reads after the
forward (inside the same traced function), so an inversion scan's captures feed a denoising
scan's inputs unchanged.

`Runtime` is the static part every forward shares: the attention kernel and the `Layout` that
maps the logical axes layers name to a device mesh. Models never look up a mesh: the layout
comes from `freeanimate_jax.parallel.runtime(mesh)` through the policy, and it is hashable, so
jit's cache sees it. Kernels: plain XLA (CPU, and whenever maps are needed),
`jax.nn.dot_product_attention` with cuDNN on GPU, Pallas flash attention on TPU (per shard,
through the layout: Mosaic kernels are not partitioned automatically).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from freeanimate_jax.models.layers import GroupNorm, Linear

Array = jax.Array
KERNELS = ("auto", "xla", "cudnn", "tpu_flash")
KERNEL_FOR_PLATFORM = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "tpu_flash"}  # else "xla"
_TPU_BLOCK = 128


class Layout(Protocol):
    """How logical axes map to devices (implemented by `parallel.MeshLayout`)."""

    def constrain(self, x: Array, logical: Sequence[str | None]) -> Array: ...

    def per_shard(self, fn: Callable[..., Array], *args: Array, axis: str) -> Array: ...


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Static runtime policy: the attention kernel (``auto``: by the default backend at trace
    time) and the device layout (None: one device, nothing to constrain)."""

    kernel: str = "auto"
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {self.kernel!r}; expected one of "
                             f"{KERNELS}")

    def constrain(self, x: Array, logical: Sequence[str | None]) -> Array:
        return x if self.layout is None else self.layout.constrain(x, logical)


DEFAULT_RUNTIME = Runtime()


def _pick_kernel(kernel: str, lq: int, lk: int, causal: bool) -> str:
    if kernel == "auto":
        kernel = KERNEL_FOR_PLATFORM.get(jax.default_backend(), "xla")
    # The Pallas kernel tiles sequences in 128-blocks; short or ragged sequences (cross-attention
    # to 77 text tokens, the 8x8 mid block) are cheap and go to XLA.
    if kernel == "tpu_flash" and (causal or lq % _TPU_BLOCK or lk % _TPU_BLOCK):
        kernel = "xla"
    return kernel


def attention_maps(q_blhd: Array, k_blhd: Array, scale: float, causal: bool = False) -> Array:
    """softmax(q k^T * scale) in fp32: (B, H, Lq, Lk)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_blhd.astype(jnp.float32),
                        k_blhd.astype(jnp.float32)) * scale
    if causal:
        lq, lk = logits.shape[-2:]
        mask = jnp.tril(jnp.ones((lq, lk), bool), k=lk - lq)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def apply_maps(maps_bhqk: Array, v_blhd: Array) -> Array:
    return jnp.einsum("bhqk,bkhd->bqhd", maps_bhqk, v_blhd.astype(jnp.float32)).astype(
        v_blhd.dtype)


def _tpu_flash(q_blhd: Array, k_blhd: Array, v_blhd: Array, scale: float,
               layout: Layout | None, batch_axis: str) -> Array:
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    d = q_blhd.shape[-1]
    pad = (-d) % 128  # head dims 40/80/160 -> lane-aligned; zero columns change no dot product

    def kernel(q, k, v):
        q, k, v = (jnp.pad(rearrange(t, "b l h d -> b h l d"), ((0, 0),) * 3 + ((0, pad),))
                   for t in (q, k, v))
        return rearrange(flash_attention(q, k, v, sm_scale=scale)[..., :d], "b h l d -> b l h d")

    if layout is None:
        return kernel(q_blhd, k_blhd, v_blhd)
    # Per shard of the batch axis (its logical name: `frames` for spatial attention); a batch
    # the mesh does not divide (the single reference latent) runs replicated, by the layout's
    # rule.
    return layout.per_shard(kernel, q_blhd, k_blhd, v_blhd, axis=batch_axis)


def dot_product_attention(q: Array, k: Array, v: Array, heads: int, *, causal: bool = False,
                          scale: float | None = None, runtime: Runtime = DEFAULT_RUNTIME,
                          batch_axis: str = "frames") -> Array:
    """Multi-head attention on (B, L, H*D) projections; returns (B, Lq, H*Dv). `batch_axis`:
    the logical axis the batch is (for kernels that run per shard)."""
    q_blhd, k_blhd, v_blhd = (rearrange(t, "b l (h d) -> b l h d", h=heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q_blhd.shape[-1]) if scale is None else scale
    kernel = _pick_kernel(runtime.kernel, q.shape[1], k.shape[1], causal)
    if kernel == "tpu_flash":
        out = _tpu_flash(q_blhd, k_blhd, v_blhd, scale, runtime.layout, batch_axis)
    elif kernel == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
        out = jax.nn.dot_product_attention(q_blhd, k_blhd, v_blhd, scale=scale,
                                           is_causal=causal, implementation="cudnn")
    else:
        out = apply_maps(attention_maps(q_blhd, k_blhd, scale, causal), v_blhd)
    return rearrange(out, "b l h d -> b l (h d)")


@functools.lru_cache(maxsize=4096)
def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What one attention layer uses beside its own input (see the module docstring); every
    field is optional and traced."""

    anchor: Array | None = None
    anchor_on: Array | None = None
    hidden: Array | None = None
    maps: Array | None = None
    iba_on: Array | None = None


_NO_INPUTS = LayerInputs()


@dataclasses.dataclass
class AttnControl:
    """Per-forward attention inputs, capture policy and runtime; see the module docstring.

    Built inside the traced function and discarded after it: `captured` is filled during the
    forward and read by the caller afterwards.
    """

    inputs: Mapping[str, LayerInputs] = dataclasses.field(default_factory=dict)
    capture_hidden: tuple[str, ...] = ()
    capture_maps: tuple[str, ...] = ()
    capture_output: tuple[str, ...] = ()  # the layer's projected output (for checks, debugging)
    anchor_index: tuple[int, ...] | None = None
    anchor_layers: tuple[str, ...] = ()
    runtime: Runtime = DEFAULT_RUNTIME
    captured: dict[str, dict[str, Array]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for path, value in self.inputs.items():
            if not isinstance(value, LayerInputs):
                raise TypeError(f"attention inputs for {path!r}: {type(value).__name__}; "
                                f"expected LayerInputs")

    def layer_inputs(self, path: str) -> LayerInputs:
        return self.inputs.get(path, _NO_INPUTS)

    def wants(self, path: str, kind: str) -> bool:
        patterns = {"hidden": self.capture_hidden, "maps": self.capture_maps,
                    "output": self.capture_output}[kind]
        return _matches(path, patterns)

    def batch_anchor(self, path: str, x: Array) -> Array | None:
        if self.anchor_index is None or not _matches(path, self.anchor_layers):
            return None
        if len(self.anchor_index) != x.shape[0]:
            raise ValueError(f"{path}: anchor_index has {len(self.anchor_index)} entries for a "
                             f"batch of {x.shape[0]}")
        return x[jnp.asarray(self.anchor_index)]

    def record(self, path: str, kind: str, value: Array) -> None:
        self.captured.setdefault(path, {})[kind] = value


def plain(runtime: Runtime) -> AttnControl | None:
    """A control that carries only the runtime (no inputs, no captures); None for the default,
    so plain calls trace exactly as before."""
    return None if runtime == DEFAULT_RUNTIME else AttnControl(runtime=runtime)


def _broadcast_batch(a: Array, b: int, what: str) -> Array:
    if a.shape[0] == b:
        return a
    if a.shape[0] == 1:
        return jnp.broadcast_to(a, (b,) + a.shape[1:])
    raise ValueError(f"{what}: batch {a.shape[0]} does not match the layer's batch {b}")


class Attention(nnx.Module):
    """diffusers' `Attention` (to_q/to_k/to_v/to_out.0, optional group_norm) on channels-last
    tokens, routed through `dot_product_attention` and the `AttnControl` contract."""

    def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None,
                 heads: int = 8, dim_head: int = 64, bias: bool = False, out_bias: bool = True,
                 norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 batch_axis: str = "frames", rngs: nnx.Rngs, param_dtype=jnp.float32):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.scale = heads, dim_head ** -0.5
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (GroupNorm(norm_num_groups, query_dim, eps=eps, param_dtype=param_dtype)
                           if norm_num_groups else None)
        self.to_q = Linear(query_dim, inner, bias=bias, rngs=rngs, param_dtype=param_dtype)
        self.to_k = Linear(kv_dim, inner, bias=bias, rngs=rngs, param_dtype=param_dtype)
        self.to_v = Linear(kv_dim, inner, bias=bias, rngs=rngs, param_dtype=param_dtype)
        self.to_out = nnx.List([Linear(inner, query_dim, bias=out_bias, rngs=rngs,
                                       param_dtype=param_dtype)])
        self.path = ""  # set by `name_attention_layers` once the model is built
        self.batch_axis = batch_axis  # the logical axis of the batch (temporal: tokens)

    def __call__(self, x: Array, context: Array | None = None,
                 ctrl: AttnControl | None = None) -> Array:
        if x.ndim == 4:  # the VAE's spatial attention: tokens are pixels
            h, w = x.shape[1:3]
            out = self(rearrange(x, "b h w c -> b (h w) c"), context, ctrl)
            return rearrange(out, "b (h w) c -> b h w c", h=h, w=w)
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        out = self.to_out[0](self.attend(x, context, ctrl))
        if ctrl is not None and ctrl.wants(self.path, "output"):
            ctrl.record(self.path, "output", out)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out

    def attend(self, x: Array, context: Array | None, ctrl: AttnControl | None) -> Array:
        """Attention of (normed) tokens x, before the output projection."""
        b, path = x.shape[0], self.path
        inp = ctrl.layer_inputs(path) if ctrl is not None else _NO_INPUTS
        runtime = ctrl.runtime if ctrl is not None else DEFAULT_RUNTIME
        self_attn = context is None
        anchor = inp.anchor
        if anchor is None and ctrl is not None and self_attn:
            anchor = ctrl.batch_anchor(path, x)

        def keys_from(h: Array) -> Array:
            if not self_attn:
                return context
            if anchor is None:
                return h
            a = _broadcast_batch(anchor, b, path).astype(h.dtype)
            if inp.anchor_on is not None:  # off: [h ; h], which attends exactly like h alone
                a = jnp.where(inp.anchor_on, a, h)
            return jnp.concatenate([h, a], 1)

        def attention(q: Array, k: Array, v: Array) -> Array:
            return dot_product_attention(q, k, v, self.heads, scale=self.scale, runtime=runtime,
                                         batch_axis=self.batch_axis)

        v = self.to_v(keys_from(x))
        gate = inp.iba_on
        if inp.maps is not None:
            maps = _broadcast_batch(inp.maps, b, path)
            out = rearrange(apply_maps(maps, rearrange(v, "b l (h d) -> b l h d", h=self.heads)),
                            "b l h d -> b l (h d)")
            if gate is not None:
                out = jnp.where(gate, out, attention(self.to_q(x), self.to_k(keys_from(x)), v))
        else:
            q_src = x
            if inp.hidden is not None:
                q_src = _broadcast_batch(inp.hidden, b, path).astype(x.dtype)
                if gate is not None:
                    q_src = jnp.where(gate, q_src, x)
            q, k = self.to_q(q_src), self.to_k(keys_from(q_src))
            if ctrl is not None and ctrl.wants(path, "maps"):
                maps = attention_maps(*(rearrange(t, "b l (h d) -> b l h d", h=self.heads)
                                        for t in (q, k)), self.scale)
                ctrl.record(path, "maps", maps)
                out = rearrange(apply_maps(maps, rearrange(v, "b l (h d) -> b l h d",
                                                           h=self.heads)), "b l h d -> b l (h d)")
            else:
                out = attention(q, k, v)
        if ctrl is not None and ctrl.wants(path, "hidden"):
            ctrl.record(path, "hidden", x)
        return out


def name_attention_layers(model: nnx.Module) -> None:
    """Give every `Attention` its dotted parameter path, the key of the `attn` contract."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Attention):
            node.path = ".".join(str(p) for p in path)


def attention_paths(model: nnx.Module) -> list[str]:
    return [node.path for _, node in nnx.iter_graph(model) if isinstance(node, Attention)]
