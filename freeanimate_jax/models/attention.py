"""The one attention function every attention layer calls, and the `attn` contract.

Contract (see DESIGN.md): a model forward may receive an `AttnControl`. It carries, keyed by
layer path (e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn1``), what each layer should
use instead of or beside its own inputs:

- ``anchor``: RA-SA. Extra key/value input appended to the layer's own tokens:
  ``K = W_k [h ; h_ref]``, ``V = W_v [h ; h_ref]``. Shape (B or 1, L_ref, C).
- ``hidden``: IBA cache in ``hidden`` form: the layer's attention input at the same step of the
  inversion, ``h_pre``. Queries and keys come from it (``Q_pre = W_q h_pre``,
  ``K_pre = W_k [h_pre ; anchor]``); values come from the current input.
- ``maps``: IBA cache in ``maps`` form: the inversion's softmax maps (B, heads, Lq, Lk),
  applied to the current values. Tiny shapes only: memory is O(L^2).

- ``anchor_gate`` / ``iba_gate``: optional traced booleans switching the anchor / the IBA cache
  on or off for this call, so one scan body serves steps with and without them. A gated-off
  anchor is replaced by the keys' own source (attention over ``[h ; h]`` equals attention over
  ``h``: duplicated keys leave the softmax unchanged), so shapes never change.

and static policy: which layers capture their attention input (``hidden``), their softmax maps
(``maps``) or their projected output (``output``), and an optional in-batch anchor
(``anchor_index[b]`` = the batch element whose own input anchors element b). Captures come
back in `AttnControl.captured` in the same ``{path: {kind: array}}`` structure the inputs
use, so an inversion scan's captures feed a denoising scan's inputs unchanged.

The kernel is chosen here and only here: plain XLA (CPU, and whenever maps are needed),
`jax.nn.dot_product_attention` with cuDNN on GPU, Pallas flash attention on TPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import math
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jax.sharding import PartitionSpec as P

from freeanimate_jax.models.layers import GroupNorm, Linear

Array = jax.Array
KERNELS = ("auto", "xla", "cudnn", "tpu_flash")
_kernel = "auto"
_TPU_BLOCK = 128


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Force a kernel while tracing, e.g. ``tpu_flash`` for an ahead-of-time TPU compile."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; expected one of {KERNELS}")
    old, _kernel = _kernel, name
    try:
        yield
    finally:
        _kernel = old


def _pick_kernel(lq: int, lk: int, causal: bool) -> str:
    name = _kernel
    if name == "auto":
        name = {"gpu": "cudnn", "tpu": "tpu_flash"}.get(jax.default_backend(), "xla")
    # The Pallas kernel tiles sequences in 128-blocks; short or ragged sequences (cross-attention
    # to 77 text tokens, the 8x8 mid block) are cheap and go to XLA.
    if name == "tpu_flash" and (causal or lq % _TPU_BLOCK or lk % _TPU_BLOCK):
        name = "xla"
    return name


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


def _tpu_flash(q_blhd: Array, k_blhd: Array, v_blhd: Array, scale: float) -> Array:
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    d = q_blhd.shape[-1]
    pad = (-d) % 128  # head dims 40/80/160 -> lane-aligned; zero columns change no dot product

    def kernel(q, k, v):
        q, k, v = (jnp.pad(rearrange(t, "b l h d -> b h l d"), ((0, 0),) * 3 + ((0, pad),))
                   for t in (q, k, v))
        return rearrange(flash_attention(q, k, v, sm_scale=scale)[..., :d], "b h l d -> b l h d")

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q_blhd, k_blhd, v_blhd)
    # Mosaic kernels are not auto-partitioned: run per shard over the batch axis (frames), or
    # replicated for a batch the mesh does not divide (the single reference latent).
    spec = P(mesh.axis_names) if q_blhd.shape[0] % mesh.size == 0 else P()
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_blhd, k_blhd, v_blhd)


def dot_product_attention(q: Array, k: Array, v: Array, heads: int, *, causal: bool = False,
                          scale: float | None = None) -> Array:
    """Multi-head attention on (B, L, H*D) projections; returns (B, Lq, H*Dv)."""
    q_blhd, k_blhd, v_blhd = (rearrange(t, "b l (h d) -> b l h d", h=heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q_blhd.shape[-1]) if scale is None else scale
    kernel = _pick_kernel(q.shape[1], k.shape[1], causal)
    if kernel == "tpu_flash":
        out = _tpu_flash(q_blhd, k_blhd, v_blhd, scale)
    elif kernel == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
        out = jax.nn.dot_product_attention(q_blhd, k_blhd, v_blhd, scale=scale,
                                           is_causal=causal, implementation="cudnn")
    else:
        out = apply_maps(attention_maps(q_blhd, k_blhd, scale, causal), v_blhd)
    return rearrange(out, "b l h d -> b l (h d)")


@functools.lru_cache(maxsize=4096)
def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclasses.dataclass
class AttnControl:
    """Per-call attention inputs and capture policy; see the module docstring.

    Built inside the traced function and discarded after it: `captured` is filled during the
    forward and returned by the model next to its output.
    """

    inputs: Mapping[str, Mapping[str, Array]] = dataclasses.field(default_factory=dict)
    capture_hidden: tuple[str, ...] = ()
    capture_maps: tuple[str, ...] = ()
    capture_output: tuple[str, ...] = ()  # the layer's projected output (for checks, debugging)
    anchor_index: tuple[int, ...] | None = None
    anchor_layers: tuple[str, ...] = ()
    captured: dict[str, dict[str, Array]] = dataclasses.field(default_factory=dict)

    def layer_inputs(self, path: str) -> Mapping[str, Array]:
        return self.inputs.get(path, {})

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
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
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
        inp = ctrl.layer_inputs(path) if ctrl is not None else {}
        self_attn = context is None
        anchor = inp.get("anchor")
        if anchor is None and ctrl is not None and self_attn:
            anchor = ctrl.batch_anchor(path, x)

        def keys_from(h: Array) -> Array:
            if not self_attn:
                return context
            if anchor is None:
                return h
            a = _broadcast_batch(anchor, b, path).astype(h.dtype)
            if "anchor_gate" in inp:  # off: [h ; h], which attends exactly like h alone
                a = jnp.where(inp["anchor_gate"], a, h)
            return jnp.concatenate([h, a], 1)

        v = self.to_v(keys_from(x))
        gate = inp.get("iba_gate")
        if "maps" in inp:
            maps = _broadcast_batch(inp["maps"], b, path)
            out = rearrange(apply_maps(maps, rearrange(v, "b l (h d) -> b l h d", h=self.heads)),
                            "b l h d -> b l (h d)")
            if gate is not None:
                plain = dot_product_attention(self.to_q(x), self.to_k(keys_from(x)), v,
                                              self.heads, scale=self.scale)
                out = jnp.where(gate, out, plain)
        else:
            q_src = x
            if "hidden" in inp:
                q_src = _broadcast_batch(inp["hidden"], b, path).astype(x.dtype)
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
                out = dot_product_attention(q, k, v, self.heads, scale=self.scale)
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
