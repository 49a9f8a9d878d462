"""`load(path_or_hub_id)`: a diffusers/transformers model folder or hub id -> our model.

Reads `config.json` (diffusers `_class_name` or transformers `architectures`), builds the model
abstractly (no random init), then fills it from safetensors through the strict converter.
Pickled `.bin` weights load only with `torch.load(weights_only=True)`. The model keeps its config
as `model.config` (a hashable, read-only mapping: static for `nnx.split`/jit). With `cache_dir`,
converted models are kept as orbax checkpoints (`weights/cache.py`).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax.weights.convert import WeightsError, load_state_dict

# config class name -> (module, class). The class provides `from_config(config, rngs=...)` and
# optionally `torch_key(key) -> our key | None`.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "UNet2DConditionModel": ("freeanimate_jax.models.unet", "UNet2DConditionModel"),
    "ControlNetModel": ("freeanimate_jax.models.controlnet", "ControlNetModel"),
    "AutoencoderKL": ("freeanimate_jax.models.vae", "AutoencoderKL"),
    "CLIPTextModel": ("freeanimate_jax.models.clip_text", "CLIPTextModel"),
    "MotionAdapter": ("freeanimate_jax.models.motion", "MotionAdapter"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what loading needs: configs, full-precision safetensors, tokenizer files.
_HUB_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model"]
_HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.pb", "*.h5",
               "*.ot"]


HUB_FILE = "hf://"  # hf://owner/repo/path/in/repo.ext: one file of a hub repository


def resolve_file(spec: str | Path, key: str = "file") -> Path:
    """`hf://owner/repo/path/in/repo.ext` downloaded with huggingface_hub into its cache (the
    cached copy offline); anything else is a local path, returned as given (expanded)."""
    text = str(spec)
    if not text.startswith(HUB_FILE):
        return Path(text).expanduser()
    parts = text[len(HUB_FILE):].split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"{key}: {text}: expected hf://owner/repo/path/in/repo.ext")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # offline, unknown repo or file, gated: one readable line
        first = (str(e).splitlines() or [""])[0]
        raise WeightsError(
            f"{key}: could not download {filename} from the hub repo {repo} "
            f"({type(e).__name__}: {first}); expected network access, or fetch it first "
            f"(hf download {repo} {filename} --local-dir .) and give the local path") from None


def resolve_folder(path_or_hub_id: str | Path, subfolder: str | None = None, *,
                   allow_patterns: Sequence[str] | None = None) -> Path:
    """A local folder as is; an `owner/name` hub id through huggingface_hub (needed files only:
    `allow_patterns` replaces the default configs/safetensors/tokenizer patterns)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
    elif _HUB_ID.match(str(path_or_hub_id)):
        from huggingface_hub import snapshot_download

        allow = [f"{subfolder}/{p}" for p in _HUB_ALLOW] if subfolder else _HUB_ALLOW
        allow = list(allow_patterns) if allow_patterns is not None else allow
        try:
            root = snapshot_download(str(path_or_hub_id), allow_patterns=allow,
                                     ignore_patterns=_HUB_IGNORE)
        except Exception as e:  # offline, unknown repo, gated: one readable line
            raise WeightsError(f"{path_or_hub_id}: could not download from the hub "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
        folder = Path(root) / subfolder if subfolder else Path(root)
    else:
        raise WeightsError(f"{path_or_hub_id}: no such folder, and not a hub id (owner/name)")
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder does not exist")
    return folder


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise WeightsError(f"{folder}: no config.json (expected a diffusers or transformers "
                           f"model folder)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg}: not valid JSON ({e})") from e


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from e
    return state


def _pickle_reason(e: Exception) -> str:
    """Why torch refused the pickle, without torch's advice to retry with weights_only=False
    (it would run the file's code): convert the file to safetensors where it is trusted."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        # The reason is the line naming the blocked global (torch's wording varies by case).
        why = next((x.removeprefix("WeightsUnpickler error: ").split(". ")[0] for x in lines
                    if "GLOBAL" in x or "WeightsUnpickler" in x),
                   "it holds objects other than tensors")
        return (f"{why.rstrip('.')}; expected plain tensors: convert the file to safetensors "
                f"where you trust it, and load that")
    return lines[0] if lines else type(e).__name__


def read_torch_pickle(file: Path, *, as_numpy: bool = True) -> dict:
    """The tensors of a pickled state dict, through `torch.load(weights_only=True)`: a pickle
    that would run code is refused. Released checkpoints (Lightning, AnimateDiff) nest their
    weights under `state_dict`; non-tensor entries (configs, epoch counters) are dropped."""
    import torch

    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{file}: refused or unreadable pickle (only plain tensors load: "
                           f"torch.load(weights_only=True)): {_pickle_reason(e)}") from None
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not as_numpy:
        return tensors
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
            for k, v in tensors.items()}


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """The folder's weights: an (index of) safetensors file(s), else a `.bin` pickle."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return read_safetensors([folder / s for s in shards])
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return read_safetensors([single])
    for stem in ("diffusion_pytorch_model", "pytorch_model"):
        if (folder / f"{stem}.bin").is_file():
            return read_torch_pickle(folder / f"{stem}.bin")
    raise WeightsError(f"{folder}: no weights (expected diffusion_pytorch_model.safetensors or "
                       f"model.safetensors)")


def model_class(config: Mapping) -> type:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name not in MODEL_CLASSES:
        raise WeightsError(f"config names model class {name!r}; supported: "
                           f"{sorted(MODEL_CLASSES)}")
    module, cls = MODEL_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


class FrozenConfig(Mapping):
    """A config dict, read-only and hashable, kept on a model as `model.config`.

    A plain dict attribute would be static too, but unhashable: `nnx.split`'s GraphDef could no
    longer be a jit static argument. Values are returned as copies, so it cannot change.
    """

    def __init__(self, config: Mapping):
        try:
            self._json = json.dumps(dict(config), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"model config is not JSON-serialisable ({e})") from e
        self._data = json.loads(self._json)

    def __getitem__(self, key: str):
        return copy.deepcopy(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"FrozenConfig({self._json})"

    def to_json(self) -> str:
        return self._json


class _ShapeOnlyRngs:
    """`nnx.Rngs` stand-in for abstract builds: every stream draws one fixed key. Under
    eval_shape, nnx.Rngs updates a traced counter per draw and flax then reads the tracer's
    `.sharding`, whose error message walks the whole trace: quadratic, ~7 s instead of ~1 s for
    SD1.5's UNet on a CPU. Only shapes come out, so which key is drawn does not matter."""

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)

    def __getattr__(self, stream: str):
        if stream.startswith("_"):
            raise AttributeError(stream)
        return lambda: self._key


def build(config: Mapping, *, param_dtype=jnp.float32, abstract: bool = False,
          seed: int = 0, **switches) -> nnx.Module:
    """The model a config describes: random weights, or abstract (shapes only). `switches` go
    to `from_config` (the motion adapter's settings that its config has no key for)."""
    cls = model_class(config)

    def make():
        rngs = _ShapeOnlyRngs(seed) if abstract else nnx.Rngs(seed)
        return cls.from_config(config, rngs=rngs, param_dtype=param_dtype, **switches)

    model = nnx.eval_shape(make) if abstract else make()
    model.config = FrozenConfig(config)
    return model


def load(path_or_hub_id: str | Path, subfolder: str | None = None, *,
         dtype=jnp.float32, cache_dir: str | Path | None = None) -> nnx.Module:
    """Load a diffusers/transformers model folder or hub id into its Flax model.

    With `cache_dir`, the converted model is kept there as an orbax checkpoint, keyed by the
    folder's path, its files' sizes and mtimes, and dtype; later loads restore it.
    A single `.ckpt`/`.pt`/`.pth`/`.safetensors` file is a released-format AnimateDiff motion
    module (`weights/motion.py`; not cached: its conversion is a rename).
    `builtin:toy` is the toy family shipped in the package, every file hash-checked first
    (`load("builtin:toy", subfolder="unet")`; also vae, text_encoder, controlnet,
    motion_adapter).
    """
    from freeanimate_jax.config import TOY_MODEL

    if str(path_or_hub_id) == TOY_MODEL:
        from freeanimate_jax.toy.family import verify

        path_or_hub_id = verify()
    if subfolder is None and Path(path_or_hub_id).expanduser().is_file():
        from freeanimate_jax.weights import motion  # lazy: it builds on this module

        if motion.is_motion_file(path_or_hub_id):
            return motion.load_motion_module(path_or_hub_id, dtype=dtype)
    folder = resolve_folder(path_or_hub_id, subfolder)
    if cache_dir is not None:
        from freeanimate_jax.weights.cache import load_cached

        return load_cached(folder, cache_dir, dtype=dtype)
    return load_folder(folder, dtype=dtype)


def load_folder(folder: Path, *, dtype=jnp.float32) -> nnx.Module:
    """Convert one resolved model folder (config.json + weights), strictly."""
    config = read_config(folder)
    model = build(config, param_dtype=dtype, abstract=True)
    state = read_weights(folder)
    load_state_dict(model, state, rename=getattr(type(model), "torch_key", None), dtype=dtype,
                    what=str(folder))
    return model
