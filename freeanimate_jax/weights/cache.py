"""Converted models as orbax checkpoints: convert a PyTorch folder once, restore it later.

A converted-model directory holds `config.json` (rebuilds the model abstractly with
`loader.build`), `params/` (an orbax StandardCheckpointer checkpoint of `nnx.state(model)`) and,
written last, `MARKER` (format version, dtype). Everything is written into a hidden sibling
staging directory and renamed into place (`io/atomic.py`), so a crash never leaves a
half-written directory at the final path. A directory without the marker (or of another
format) is never trusted: `load_converted` refuses it with a WeightsError, and
`load(..., cache_dir=...)` treats it as a cache miss, converts again and replaces it. A marked
directory that orbax cannot read (damaged after it was written) is an error naming it, not a
silent reconversion. Single-process only (orbax saves are collective).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from freeanimate_jax.io.atomic import staged
from freeanimate_jax.weights.convert import WeightsError
from freeanimate_jax.weights.loader import build, load_folder

FORMAT = 1
MARKER = "freeanimate_converted.json"


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` is a finished converted checkpoint of the current format."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("format") == FORMAT and (directory / "config.json").is_file()
            and (directory / "params").is_dir())


def _floating(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def save_converted(model: nnx.Module, directory: str | Path, *, config=None,
                   overwrite: bool = False) -> Path:
    """Write `model` (params + config) to `directory` atomically; returns the directory."""
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise WeightsError("save_converted: the model has no `config` (built outside "
                           "freeanimate_jax.load/build); pass config=")
    if jax.process_count() > 1:
        raise WeightsError("save_converted: single-process only (orbax saves are collective)")
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not overwrite:
        raise WeightsError(f"{directory}: already exists (pass overwrite=True to replace it)")
    state = nnx.state(model)
    dtypes = {x.dtype.name for x in jax.tree.leaves(state) if _floating(x)}
    # Should our rename fail because another process just published a complete copy, its
    # copy is kept.
    with staged(directory, folder=True, complete=is_complete) as staging:
        with _orbax().StandardCheckpointer() as ckpt:
            ckpt.save(staging / "params", state)
            ckpt.wait_until_finished()
        (staging / "config.json").write_text(json.dumps(dict(config), indent=1, sort_keys=True))
        (staging / MARKER).write_text(json.dumps({"format": FORMAT, "dtypes": sorted(dtypes)}))
    return directory


def load_converted(directory: str | Path, dtype=None) -> nnx.Module:
    """A model saved by `save_converted`, restored into an abstract model (cast to `dtype`)."""
    directory = Path(directory).expanduser().absolute()
    if not is_complete(directory):
        raise WeightsError(f"{directory}: not a complete converted checkpoint (no valid {MARKER}"
                           f" format {FORMAT}: missing, or written by an interrupted save)")
    config = json.loads((directory / "config.json").read_text())
    if dtype is None:  # the saved dtype (models from `load` have one)
        saved = json.loads((directory / MARKER).read_text())["dtypes"]
        if len(saved) != 1:
            raise WeightsError(f"{directory}: parameters of several dtypes {saved}; pass dtype=")
        dtype = saved[0]
    model = build(config, param_dtype=dtype, abstract=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, dtype if _floating(x) else x.dtype, sharding=device), nnx.state(model))
    try:
        with _orbax().StandardCheckpointer() as ckpt:
            restored = ckpt.restore(directory / "params", target)
    except Exception as e:  # corrupt after completion: one line, no silent fallback
        first = (str(e).splitlines() or [""])[0]
        raise WeightsError(f"{directory}: unreadable converted checkpoint ({type(e).__name__}: "
                           f"{first}); delete it to convert again") from e
    nnx.update(model, restored)
    return model


def cache_key(folder: Path, dtype) -> str:
    """Entry name: folder name + hash of its resolved path, files' sizes/mtimes, and dtype."""
    folder = folder.resolve()
    files = sorted((f.name, st.st_size, st.st_mtime_ns) for f in folder.iterdir()
                   if f.is_file() and (st := f.stat()))
    blob = json.dumps({"folder": str(folder), "files": files, "dtype": jnp.dtype(dtype).name,
                       "format": FORMAT})
    return f"{folder.name}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def load_cached(folder: Path, cache_dir: str | Path, *, dtype=jnp.float32) -> nnx.Module:
    """Restore `folder`'s converted model from `cache_dir`, or convert it and save it there."""
    entry = Path(cache_dir).expanduser().absolute() / cache_key(folder, dtype)
    if is_complete(entry):
        return load_converted(entry, dtype=dtype)
    model = load_folder(folder, dtype=dtype)
    try:
        save_converted(model, entry, overwrite=True)
    except (OSError, WeightsError) as e:  # the model is fine; only the cache failed
        warnings.warn(f"{entry}: could not write the converted-model cache ({e})", stacklevel=3)
    return model
