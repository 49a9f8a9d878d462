"""MotionAdapter -> a diffusers MotionAdapter folder, or a file in the released AnimateDiff layout.

Both carry the sinusoidal position tables their loaders expect (diffusers: one `pos_embed.pe`
per transformer block; the original: one `pos_encoder.pe` per attention), computed as the model
computes them. Writes are atomic: a staging file or folder beside the target, then `os.replace`,
so a reader never sees half an export.

The weights do not record GroupNorm semantics: a diffusers folder reloads with diffusers'
across-frame GroupNorm, an original-layout file with the original per-frame one (and v1's
across-frame resnet norms when its table has 24 positions), whatever the adapter used.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flax import nnx

from freeanimate_jax.io.atomic import staged
from freeanimate_jax.models.motion import MotionAdapter
from freeanimate_jax.models.unet_blocks import BasicTransformerBlock, sinusoidal_positions
from freeanimate_jax.weights.convert import WeightsError, export_state_dict
from freeanimate_jax.weights.motion import diffusers_to_original_key

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _position_tables(adapter: MotionAdapter, *, original: bool) -> dict[str, np.ndarray]:
    tables = {}
    for path, node in nnx.iter_graph(adapter):
        if not isinstance(node, BasicTransformerBlock) or not node.positions:
            continue
        block = ".".join(map(str, path))
        pe = sinusoidal_positions(node.positions, node.attn1.to_q.in_features)[None]
        if original:
            for attn in ("attn1", "attn2"):
                tables[f"{diffusers_to_original_key(f'{block}.{attn}')}.pos_encoder.pe"] = pe
        else:
            tables[f"{block}.pos_embed.pe"] = pe
    return tables


def adapter_state(adapter: MotionAdapter, *, original: bool) -> dict[str, np.ndarray]:
    """All tensors of an export: PyTorch layouts, diffusers or original names, position tables."""
    if not isinstance(adapter, MotionAdapter):
        raise TypeError(f"expected a MotionAdapter, got {type(adapter).__name__}")
    state = export_state_dict(adapter)
    if original:
        state = {diffusers_to_original_key(k): v for k, v in state.items()}
    state.update(_position_tables(adapter, original=original))
    # safetensors writes raw buffers: transposed views must be made contiguous.
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


@contextlib.contextmanager
def _staged(target: Path, *, folder: bool, overwrite: bool) -> Iterator[Path]:
    try:
        with staged(target, folder=folder, overwrite=overwrite) as staging:
            yield staging
    except FileExistsError as e:  # refused up front: nothing was written
        hint = "" if overwrite else " (pass overwrite=True to replace it)"
        raise WeightsError(f"{e}{hint}") from None


def _save(state: dict[str, np.ndarray], file: Path) -> None:
    from safetensors.numpy import save_file

    save_file(state, str(file), metadata={"format": "pt"})  # "pt": what torch loaders check


def export_motion_adapter(adapter: MotionAdapter, folder: str | Path, *,
                          overwrite: bool = False) -> Path:
    """Write a diffusers MotionAdapter folder (`config.json` + safetensors); returns it."""
    folder = Path(folder).expanduser()
    state = adapter_state(adapter, original=False)
    with _staged(folder, folder=True, overwrite=overwrite) as staging:
        config = json.dumps(adapter.cfg.to_diffusers(), indent=2, sort_keys=True)
        (staging / "config.json").write_text(config + "\n")
        _save(state, staging / WEIGHTS_NAME)
    return folder


def export_original(adapter: MotionAdapter, file: str | Path, *,
                    overwrite: bool = False) -> Path:
    """Write the adapter in the released AnimateDiff key layout, as `.safetensors` (a pickle
    could not be read back safely by others); returns the file."""
    file = Path(file).expanduser()
    if file.suffix.lower() != ".safetensors":
        raise WeightsError(f"{file}: export_original writes .safetensors files only")
    state = adapter_state(adapter, original=True)
    with _staged(file, folder=False, overwrite=overwrite) as staging:
        _save(state, staging)
    return file


def export_model_folder(model: nnx.Module, config: dict, folder: str | Path, *,
                        overwrite: bool = False) -> Path:
    """Write a diffusers model folder (`config.json` + safetensors in PyTorch names and
    layouts) for a UNet2DConditionModel or ControlNetModel of ours; returns it."""
    folder = Path(folder).expanduser()
    state = {k: np.ascontiguousarray(v) for k, v in export_state_dict(model).items()}
    with _staged(folder, folder=True, overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True)
                                             + "\n")
        _save(state, staging / WEIGHTS_NAME)
    return folder
