"""PyTorch state dict -> our parameters: a rename, a per-layer transpose, a strict key check.

Our parameter paths equal the PyTorch keys (see `models/layers.py`), so the rename is the
identity except for the few prefixes and renames a caller passes in. Transposes come from each
layer's `TORCH_LAYOUT`. Any missing, unexpected or mis-shaped key fails with one readable error.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax.weights.errors import WeightsError  # re-exported


def _param_slots(model: nnx.Module) -> dict[str, tuple[nnx.Param, tuple[int, ...] | None]]:
    slots = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or isinstance(node, nnx.List):
            continue
        layout = getattr(type(node), "TORCH_LAYOUT", {})
        prefix = ".".join(str(p) for p in path)
        for name, value in vars(node).items():
            if isinstance(value, nnx.Param):
                slots[f"{prefix}.{name}" if prefix else name] = (value, layout.get(name))
    return slots


def parameter_names(model: nnx.Module) -> list[str]:
    return sorted(_param_slots(model))


def _describe(missing: list[str], unexpected: list[str], misshaped: list[str], what: str) -> str:
    lines = [f"{what}: weights do not match the model"]
    shown = 12
    for key in missing[:shown]:
        guess = difflib.get_close_matches(key, unexpected, n=1, cutoff=0.8)
        hint = f" (found {guess[0]!r} instead: renamed?)" if guess else ""
        lines.append(f"  missing:    {key}{hint}")
    if len(missing) > shown:
        lines.append(f"  ... and {len(missing) - shown} more missing")
    for key in unexpected[:shown]:
        lines.append(f"  unexpected: {key}")
    if len(unexpected) > shown:
        lines.append(f"  ... and {len(unexpected) - shown} more unexpected")
    lines += [f"  wrong shape: {m}" for m in misshaped[:shown]]
    return "\n".join(lines)


def load_state_dict(model: nnx.Module, state: Mapping[str, np.ndarray], *,
                    rename: Callable[[str], str | None] | None = None,
                    dtype=jnp.float32, what: str = "model") -> None:
    """Copy `state` (PyTorch names and layouts) into `model` in place, strictly.

    `rename` maps a source key to our key, or None to drop it on purpose (e.g. buffers such
    as CLIP's `position_ids`). The model may be abstract (built under `nnx.eval_shape`).
    """
    slots = _param_slots(model)
    renamed: dict[str, str] = {}
    for key in state:
        ours = rename(key) if rename else key
        if ours is not None:
            renamed[ours] = key
    missing = sorted(set(slots) - set(renamed))
    unexpected = sorted(renamed[k] for k in set(renamed) - set(slots))
    misshaped, updates = [], {}
    for ours, (param, layout) in slots.items():
        if ours not in renamed:
            continue
        arr = np.asarray(state[renamed[ours]])
        if layout is not None and arr.ndim == len(layout):
            arr = arr.transpose(layout)
        if tuple(arr.shape) != tuple(param.shape):
            misshaped.append(f"{renamed[ours]}: checkpoint {tuple(arr.shape)} (after transpose),"
                             f" model {tuple(param.shape)}")
            continue
        updates[ours] = arr
    if missing or unexpected or misshaped:
        raise WeightsError(_describe(missing, unexpected, misshaped, what))
    for ours, arr in updates.items():
        slots[ours][0].set_value(jnp.asarray(arr, dtype=dtype))


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters in PyTorch names and layouts (the inverse of `load_state_dict`)."""
    out = {}
    for key, (param, layout) in _param_slots(model).items():
        arr = np.asarray(param.get_value())
        if layout is not None and arr.ndim == len(layout):
            arr = arr.transpose(np.argsort(layout))
        out[key] = arr
    return out
