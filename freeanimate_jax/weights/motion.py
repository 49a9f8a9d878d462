"""AnimateDiff motion modules in their released (original) format, and motion/domain LoRAs.

The released `mm_sd_v15*.ckpt` files name layers as AnimateDiff's own UNet3D does
(`temporal_transformer`, `attention_blocks.0`, `norms.0`, `ff_norm`); diffusers renames them and
drops the sinusoidal `pos_encoder.pe` buffers. One renaming table serves both directions. The
model config is not stored in these files, so it is read off the weights: block channels from
`proj_in`, module counts from the keys, the position table length from `pe`, the mid block (v2)
from its keys. Heads (8) and GroupNorm groups (32) leave no trace in the shapes: the released
values are the defaults. Original files keep the original code's semantics: the motion module's
GroupNorm is per frame, and v1's resnet GroupNorms span all frames.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax.models.layers import Linear
from freeanimate_jax.models.motion import MotionAdapter, MotionConfig
from freeanimate_jax.models.unet_blocks import sinusoidal_positions
from freeanimate_jax.weights import loader
from freeanimate_jax.weights.convert import WeightsError, load_state_dict

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
FILE_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")
VERSIONS = ("v1", "v2", "v3")
RELEASED_HEADS, RELEASED_GROUPS = 8, 32
_EXAMPLE_KEY = "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"

# (original, diffusers) name fragments; `#` is any index. Read left to right to load, right to
# left to export. Fragments match whole dotted segments only, so the module's own `norm` and
# the spatial UNet's names pass through unchanged.
_RENAMES = (
    ("motion_modules.#.temporal_transformer", "motion_modules.#"),
    ("attention_blocks.0", "attn1"),
    ("attention_blocks.1", "attn2"),
    ("norms.0", "norm1"),
    ("norms.1", "norm2"),
    ("ff_norm", "norm3"),
)


def _compile(src: str, dst: str) -> tuple[re.Pattern, str]:
    body = re.escape(src).replace(r"\#", r"(\d+)")
    return re.compile(rf"(?<![^.]){body}(?![^.])"), dst.replace("#", r"\1")


_TO_DIFFUSERS = [_compile(o, d) for o, d in _RENAMES]
_TO_ORIGINAL = [_compile(d, o) for o, d in _RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, repl in table:
        key = pattern.sub(repl, key)
    return key


def original_to_diffusers_key(key: str) -> str | None:
    """A released-format key in diffusers' naming; None for the `pos_encoder.pe` tables (fixed
    buffers the model recomputes, dropped as diffusers' conversion drops them)."""
    return None if key.endswith("pos_encoder.pe") else _rename(key, _TO_DIFFUSERS)


def diffusers_to_original_key(key: str) -> str | None:
    """The reverse of `original_to_diffusers_key`. None for diffusers' `pos_embed.pe`: it has one
    table per transformer block where the original has one per attention (export writes those)."""
    return None if key.endswith("pos_embed.pe") else _rename(key, _TO_ORIGINAL)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16
        import torch

        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def read_state_file(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of one `.ckpt`/`.pt`/`.pth`/`.safetensors` file, unwrapped from a
    `state_dict` entry and stripped of a `module.` (DataParallel) prefix."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if suffix not in FILE_SUFFIXES:
        raise WeightsError(f"{path}: unknown weights format {suffix!r} (expected one of "
                           f"{', '.join(FILE_SUFFIXES)}, or a diffusers model folder)")
    state = (loader.read_safetensors([path]) if suffix == ".safetensors"
             else loader.read_torch_pickle(path))
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_motion_state(path: str | Path) -> dict[str, np.ndarray]:
    """A released motion module file's tensors, in their original key naming."""
    state = read_state_file(path)
    motion = [k for k in state if ".motion_modules." in k]
    lora = any("lora" in k for k in motion)
    if lora or not any(".temporal_transformer." in k for k in motion):
        sd = any(k.startswith("model.diffusion_model.") for k in state)
        hint = ("; this is a motion LoRA: merge it into a module with merge_lora" if lora
                else "; diffusers layout: load its folder, with config.json" if motion
                else "; a Stable Diffusion checkpoint: see weights.single_file" if sd else "")
        raise WeightsError(f"{path}: not an AnimateDiff motion module (expected keys like "
                           f"{_EXAMPLE_KEY}){hint}")
    return state


class Version(str):
    """A release name ("v1", "v2" or "v3") with `reason`: the evidence that decided it."""

    reason: str

    def __new__(cls, name: str, reason: str) -> Version:
        self = super().__new__(cls, name)
        self.reason = reason
        return self


def _table_length(state: Mapping[str, np.ndarray]) -> int | None:
    tables = {k: v for k, v in state.items() if k.endswith("pos_encoder.pe")}
    for key, pe in tables.items():
        if np.ndim(pe) != 3:
            raise WeightsError(f"{key}: shape {np.shape(pe)}, expected (1, positions, channels)")
    lengths = {int(v.shape[1]) for v in tables.values()}
    if len(lengths) > 1:
        raise WeightsError(f"position tables of different lengths {sorted(lengths)} in one module")
    return lengths.pop() if lengths else None


def detect_version(state: Mapping[str, np.ndarray]) -> Version:
    """Which release an original-format state is, as diffusers' single-file loader decides it:
    a mid-block module means v2, else a 24-position table v1, else v3."""
    length = _table_length(state)
    if any(k.startswith("mid_block.motion_modules.") for k in state):
        return Version("v2", "it has a mid-block motion module (only v2 does)")
    if length is None:
        raise WeightsError("cannot tell v1 from v3: no mid-block module and no pos_encoder.pe "
                           "table to read the position count from; pass version=")
    if length == 24:
        return Version("v1", "no mid-block module and a 24-position table")
    return Version("v3", f"no mid-block module and a {length}-position table (v1 has 24)")


def _count(state: Mapping, prefix: str, after: str) -> int:
    """How many `prefix.<n>.` indices follow `prefix` (`after` names the level, for errors)."""
    found = {int(m[1]) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise WeightsError(f"{prefix}: {after} indices {sorted(found)} are not 0..n-1")
    return len(found)


def infer_config(state: Mapping[str, np.ndarray], version: str, *, heads: int = RELEASED_HEADS,
                 groups: int = RELEASED_GROUPS) -> MotionConfig:
    """The MotionConfig an original-format state was trained as (see the module docstring)."""
    blocks = _count(state, "down_blocks", "block")
    channels, layers, transformer_layers = [], [], []
    for i in range(blocks):
        proj_in = state.get(f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight")
        if proj_in is None:
            raise WeightsError(f"down_blocks.{i}: no motion_modules.0 proj_in weight to read the "
                               f"channels from")
        channels.append(int(proj_in.shape[0]))
        layers.append(_count(state, f"down_blocks.{i}.motion_modules", "module"))
        transformer_layers.append(_count(
            state, f"down_blocks.{i}.motion_modules.0.temporal_transformer.transformer_blocks",
            "transformer block"))
    if not blocks:
        raise WeightsError("no down_blocks motion modules to read the block channels from")
    for c in channels:
        if c % heads or c % groups:
            raise WeightsError(f"{c} motion channels do not split into {heads} heads and "
                               f"{groups} groups; pass heads=/groups=")
    length = _table_length(state) or (24 if version == "v1" else 32)
    return MotionConfig(
        block_out_channels=tuple(channels), layers_per_block=tuple(layers),
        transformer_layers=tuple(transformer_layers), heads=(heads,) * blocks, groups=groups,
        max_seq_length=length, mid_block=any(k.startswith("mid_block.") for k in state),
        norm_per_frame=True, resnet_norm_across_frames=version == "v1")


def is_motion_file(path: str | Path) -> bool:
    """Whether `path` is a single weights file (what `freeanimate_jax.load` reads as an
    original-format motion module); model folders are directories."""
    path = Path(path).expanduser()
    return path.suffix.lower() in FILE_SUFFIXES and path.is_file()


def load_motion_module(path_or_hub_id: str | Path, *, version: str | None = None,
                       heads: int | None = None, groups: int | None = None,
                       dtype=jnp.float32) -> MotionAdapter:
    """A motion module as a MotionAdapter, from (a) a diffusers MotionAdapter folder or hub id
    (diffusers semantics: GroupNorm across frames), or (b) a released-format file (original
    semantics: per-frame GroupNorm; across-frame resnet norms for v1). `version` overrides the
    detected release; `heads`/`groups` the released 8/32; all three apply to files only."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_file():
        state = read_motion_state(path)
        found = detect_version(state) if version is None else None
        if version is not None and version not in VERSIONS:
            raise WeightsError(f"version={version!r}: expected one of {VERSIONS}")
        if found is not None:
            log.info("%s: AnimateDiff %s: %s", path, found, found.reason)
        cfg = infer_config(state, version or found, heads=heads or RELEASED_HEADS,
                           groups=groups or RELEASED_GROUPS)
        for key, value in state.items():
            if key.endswith("pos_encoder.pe"):
                _check_table(key, value)
        adapter = nnx.eval_shape(lambda: MotionAdapter(
            cfg, rngs=loader._ShapeOnlyRngs(0), param_dtype=dtype))  # shapes only, as in build
        load_state_dict(adapter, state, rename=original_to_diffusers_key, dtype=dtype,
                        what=str(path))
        return adapter
    given = [k for k, v in dict(version=version, heads=heads, groups=groups).items()
             if v is not None]
    if given:
        raise WeightsError(f"{path_or_hub_id}: {'/'.join(given)}= apply to original-format files;"
                           f" a diffusers folder's config.json fixes them")
    model = loader.load(path_or_hub_id, dtype=dtype)
    if not isinstance(model, MotionAdapter):
        raise WeightsError(f"{path_or_hub_id}: holds a {type(model).__name__}, not a "
                           f"MotionAdapter")
    return model


def _check_table(key: str, pe: np.ndarray) -> None:
    # The tables are recomputed, not loaded: refuse one that differs rather than ignore it.
    # The tolerance admits fp16 copies of the release.
    want = sinusoidal_positions(pe.shape[1], pe.shape[2])[None]
    if pe.shape != want.shape or not np.allclose(np.asarray(pe, np.float32), want, atol=2e-3):
        raise WeightsError(f"{key}: not AnimateDiff's sinusoidal position table; other "
                           f"position encodings are not supported")


# to_q/to_k/to_v/to_out LoRA weights: AnimateDiff's (diffusers' old attention-processor format)
# `attn1.processor.to_q_lora.down.weight`, diffusers' `attn1.to_q.lora.down.weight`, and PEFT's
# `attn1.to_q.lora_A.weight`; `to_out` targets the projection `to_out.0`.
_LORA_KEY = re.compile(r"^(?P<layer>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)(?:\.0)?"
                       r"(?:(?:_lora|\.lora)\.(?P<old>down|up)|\.lora_(?P<peft>A|B))\.weight$")


def merge_lora(model: nnx.Module, lora_state: Mapping | str | Path, scale: float = 1.0, *,
               target: str = "motion") -> None:
    """Merge a LoRA into `model`'s attention projections in place: W += scale * up @ down
    (PyTorch's (out, in) layout; ours stores W transposed).

    `target="motion"`: a motion LoRA on the motion modules of a MotionAdapter or UNetMotionModel;
    `target="spatial"`: AnimateDiff v3's domain adapter on a UNet's spatial attention. Strict and
    all-or-nothing: a key that is not a LoRA weight, targets the other kind of layer, a layer
    this model lacks, or a shape that does not fit fails before any weight changes. A
    UNetMotionModel shares its weights with the UNet and adapter it was built from: they change
    too. Merge before placing weights on devices (merged weights are plain arrays).
    """
    if target not in ("motion", "spatial"):
        raise ValueError(f"target={target!r}: expected 'motion' or 'spatial'")
    if not isinstance(lora_state, Mapping):
        lora_state = read_state_file(lora_state)
    factors: dict[str, dict[str, np.ndarray]] = {}
    first_key: dict[str, str] = {}
    bad: list[str] = []
    for key, value in lora_state.items():
        name = original_to_diffusers_key(key.removeprefix("module.").removeprefix("unet."))
        m = _LORA_KEY.match(name or "")
        if m is None:
            bad.append(f"{key} (not a to_q/to_k/to_v/to_out LoRA weight)")
            continue
        layer = f"{m['layer']}.{m['proj']}" + (".0" if m["proj"] == "to_out" else "")
        if ("motion_modules" in layer.split(".")) != (target == "motion"):
            bad.append(f"{key} (not a {target} layer)")
            continue
        part = m["old"] or {"A": "down", "B": "up"}[m["peft"]]
        factors.setdefault(layer, {})[part] = _to_numpy(value)
        first_key.setdefault(layer, key)
    linears = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, Linear)}
    deltas = {}
    for layer, f in factors.items():
        key, lin = first_key[layer], linears.get(layer)
        if len(f) != 2:
            bad.append(f"{key} (no matching {'up' if 'down' in f else 'down'} weight)")
        elif lin is None:
            bad.append(f"{key} (this model has no layer {layer})")
        elif (f["down"].ndim != 2 or f["up"].ndim != 2 or f["up"].shape[1] != f["down"].shape[0]
              or (f["down"].shape[1], f["up"].shape[0]) != tuple(lin.weight.shape)):
            bad.append(f"{key} (up {tuple(f['up'].shape)} @ down {tuple(f['down'].shape)} vs "
                       f"{layer} (out, in) {tuple(lin.weight.shape)[::-1]})")
        else:  # float64: one rounding, at the final cast, as close to any reference as can be
            deltas[layer] = (f["up"].astype(np.float64) @ f["down"].astype(np.float64)).T
    if bad:
        more = f"; ... and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise WeightsError(f"LoRA for the wrong base: {len(bad)} key(s) do not fit this model: "
                           + "; ".join(bad[:3]) + more)
    if not deltas:
        raise WeightsError("LoRA state holds no to_q/to_k/to_v/to_out LoRA weights")
    for layer, delta in deltas.items():
        w = linears[layer].weight.get_value()
        merged = np.asarray(w, np.float64) + scale * delta
        linears[layer].weight.set_value(jnp.asarray(merged, dtype=w.dtype))
