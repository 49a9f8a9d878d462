"""`load_single_file`: one original-layout Stable Diffusion 1.x checkpoint -> our models.

A single file (A1111/CompVis layout: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`) holds weights only, no configs. diffusers converts it once
(`StableDiffusionPipeline.from_single_file`, offline) with the model configs, tokenizer and
scheduler of a diffusers SD folder or hub id (`config`); the result is saved as a diffusers folder
in a cache directory and loaded from there with `load_pipeline`, strictly, like any other folder.
Later calls find the folder and skip diffusers altogether.

`.safetensors` is read as is. Pickled single files (`.ckpt`, `.pt`, `.pth`, `.bin`) load only
with `torch.load(weights_only=True)`, so a pickle that would run code is refused, never run.
Cache entries are written to a hidden staging directory and renamed into place, marked complete
last: an interrupted conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp

from freeanimate_jax.io.atomic import staged
from freeanimate_jax.weights.convert import WeightsError
from freeanimate_jax.weights.loader import read_torch_pickle, resolve_folder
from freeanimate_jax.weights.pipeline import (
    MODEL_COMPONENTS,
    SDPipelineModels,
    check_pipeline_folder,
    load_pipeline,
)

DEFAULT_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"
FORMAT = 1
MARKER = "freeanimate_single_file.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")
# Component -> key prefix in an original SD 1.x single file.
SD1_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.transformer."}
# Prefixes that identify what a file is when it is not an SD 1.x checkpoint.
_OTHER_LAYOUTS = (
    ("conditioner.embedders.", "an SDXL checkpoint (only SD 1.x single files are supported)"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint (OpenCLIP text encoder; only SD 1.x "
                                "single files are supported: convert it to a diffusers folder)"),
    ("lora_", "a LoRA (apply it with freeanimate_jax.weights.lora.merge_lora)"),
    ("unet.", "a LoRA in diffusers naming (apply it with merge_lora)"),
    ("down_blocks.", "a diffusers-format state dict (load its diffusers folder instead)"),
    ("text_model.", "a transformers CLIP state dict (load its diffusers folder instead)"),
    ("encoder.down.", "a VAE alone (a full SD 1.x checkpoint is needed)"),
)


def default_cache_dir() -> Path:
    """`freeanimate_jax/single_file` under the user cache folder (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "freeanimate_jax" / "single_file"


def config_patterns() -> list[str]:
    """The files of a hub config repo that conversion reads: configs and tokenizer, no weights
    (the weights come from the single file)."""
    patterns = ["model_index.json", "scheduler/scheduler_config.json"]
    patterns += [f"{sub}/config.json" for sub in MODEL_COMPONENTS]
    return patterns + [f"tokenizer/{name}" for name in TOKENIZER_FILES]


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _read_safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return list(f.keys())
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e


def check_sd1_keys(keys: Iterable[str], path: Path) -> None:
    """One WeightsError line unless the keys hold an SD 1.x UNet, VAE and CLIP text encoder."""
    keys = list(keys)
    missing = [sub for sub, prefix in SD1_PREFIXES.items()
               if not any(k.startswith(prefix) for k in keys)]
    if not missing:
        return
    for prefix, what in _OTHER_LAYOUTS:
        if any(k.startswith(prefix) for k in keys):
            raise WeightsError(f"{path}: not a Stable Diffusion 1.x checkpoint: looks like {what}")
    expected = ", ".join(f"{SD1_PREFIXES[sub]}* ({sub})" for sub in missing)
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise WeightsError(f"{path}: not a Stable Diffusion 1.x checkpoint: no {expected} keys "
                       f"(found {len(keys)} keys, e.g. {sample})")


def cache_key(path: Path, config_root: Path) -> str:
    """Entry name: the file's stem + a hash of its name, size and mtime, and the config folder."""
    st = path.stat()
    blob = json.dumps({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "config": str(config_root.resolve()), "format": FORMAT})
    stem = re.sub(r"[^\w.-]", "_", path.stem)[:64]
    return f"{stem}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def is_complete(entry: Path) -> bool:
    try:
        return json.loads((entry / MARKER).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers and transformers log progress bars and config advice on every conversion;
    keep only errors."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in (dlog, tlog)]
    for log, _, _ in saved:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level, bars in saved:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


def _convert(checkpoint: Path, config_root: Path, out: Path, what: Path) -> None:
    """diffusers' single-file conversion of `checkpoint` (original-layout safetensors; `what`:
    the user's file, for messages) with the configs in `config_root`, saved as a diffusers
    folder at `out`."""
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        with _quiet_diffusers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = StableDiffusionPipeline.from_single_file(
                str(checkpoint), config=str(config_root), local_files_only=True,
                torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
                image_encoder=None, requires_safety_checker=False)
    except Exception as e:
        hint = ("some weights the config needs are missing from the file" if "meta tensor" in
                str(e) else _first_line(e))
        raise WeightsError(f"{what}: diffusers could not convert it with the configs of "
                           f"{config_root} ({hint}); a checkpoint for another base model, or an "
                           f"incomplete file?") from e
    # diffusers builds the models empty and fills what the file has: a weight the file lacks
    # stays on the meta device instead of failing.
    empty = [f"{sub}.{name}" for sub in MODEL_COMPONENTS
             for name, p in getattr(pipe, sub).named_parameters() if p.is_meta]
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise WeightsError(f"{what}: weights missing from the file: "
                           f"{', '.join(empty[:5])}{more}")
    with _quiet_diffusers():
        pipe.save_pretrained(str(out), safe_serialization=True)


def _build_entry(path: Path, config_root: Path, entry: Path) -> None:
    """Convert `path` into the diffusers folder `entry`, atomically: an interrupted earlier
    attempt is replaced, a complete entry that another process published meanwhile is kept."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.scratch-") as tmp, \
            staged(entry, folder=True, complete=is_complete, keep_complete=True) as model_dir:
        source = path
        if path.suffix.lower() in PICKLE_SUFFIXES:
            # Loaded here with weights_only=True and rewritten as safetensors, so diffusers
            # never unpickles the file itself.
            from safetensors.torch import save_file

            state = read_torch_pickle(path, as_numpy=False)
            check_sd1_keys(state, path)
            prefixes = tuple(SD1_PREFIXES.values())
            # clone: tensors of a pickle may share storage, which safetensors refuses
            state = {k: v.detach().clone().contiguous() for k, v in state.items()
                     if k.startswith(prefixes)}
            source = Path(tmp) / "checkpoint.safetensors"
            save_file(state, str(source))
            del state
        _convert(source, config_root, model_dir, path)
        st = path.stat()
        (model_dir / MARKER).write_text(json.dumps({
            "format": FORMAT, "source": path.name, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "config": str(config_root)}))


def resolve_config(config: str | Path) -> Path:
    """A local diffusers SD folder, or a hub id fetched for its configs and tokenizer only."""
    try:
        root = resolve_folder(config, allow_patterns=config_patterns())
    except WeightsError as e:  # typically offline with an uncached hub id
        raise WeightsError(f"{e}; the model configs are needed: pass config= a local diffusers "
                           f"SD 1.x folder") from e
    check_pipeline_folder(root)
    if not (root / "model_index.json").is_file():
        raise WeightsError(f"{root}: no model_index.json (expected a diffusers Stable Diffusion "
                           f"folder for the configs)")
    return root


def load_single_file(path: str | Path, *, config: str | Path = DEFAULT_CONFIG,
                     cache_dir: str | Path | None = None,
                     dtype=jnp.float32) -> SDPipelineModels:
    """Load an original-layout SD 1.x single-file checkpoint into our models.

    `config`: a diffusers SD folder or hub id giving the model configs, tokenizer and scheduler
    (only those files are fetched from the hub; offline, a hub id must already be in the
    huggingface cache). The first call converts the file with diffusers into
    `cache_dir/<stem>-<hash>` (default `default_cache_dir()`), keyed by the file's name, size
    and mtime and by the config folder; later calls load that folder directly. Models are
    loaded strictly in `dtype`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_sd1_keys(_read_safetensors_keys(path), path)
    elif suffix not in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: unsupported single-file type {suffix or '(none)'!r}; "
                           f"expected .safetensors or a {'/'.join(PICKLE_SUFFIXES)} pickle")
    config_root = resolve_config(config)
    store = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = store.absolute() / cache_key(path, config_root)
    if not is_complete(entry):
        try:
            _build_entry(path, config_root, entry)
        except OSError as e:  # an unwritable cache: convert into a temporary folder instead
            warnings.warn(f"{entry}: could not write the single-file cache ({e}); converting "
                          f"into a temporary folder", stacklevel=2)
            with tempfile.TemporaryDirectory() as tmp:
                _build_entry(path, config_root, Path(tmp) / entry.name)
                return load_pipeline(Path(tmp) / entry.name, dtype=dtype)
    return load_pipeline(entry, dtype=dtype)
