"""`load_pipeline`: a diffusers Stable Diffusion folder or hub id -> our models, in one call.

A hub id is fetched once with `snapshot_download`, restricted to what loading reads (the
components' configs and full-precision safetensors, the tokenizer, the scheduler config); each
component then loads from that local snapshot through `freeanimate_jax.load`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from freeanimate_jax.diffusion.ddim import SchedulerConfig
from freeanimate_jax.weights.convert import WeightsError
from freeanimate_jax.weights.loader import load, model_class, read_config, resolve_folder

# subfolder -> (weights file stem, expected model class)
MODEL_COMPONENTS = {
    "unet": ("diffusion_pytorch_model", "UNet2DConditionModel"),
    "vae": ("diffusion_pytorch_model", "AutoencoderKL"),
    "text_encoder": ("model", "CLIPTextModel"),
}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


def hub_patterns() -> list[str]:
    """Exactly the files `load_pipeline` reads: no safety checker, feature extractor, fp16,
    non-EMA, .ckpt/.bin/ONNX/Flax weights (huggingface_hub's `*` also matches `/`, so every
    pattern names its subfolder)."""
    patterns = ["model_index.json", "scheduler/scheduler_config.json"]
    patterns += [f"tokenizer/{name}" for name in _TOKENIZER_FILES]
    for sub, (stem, _) in MODEL_COMPONENTS.items():
        patterns += [f"{sub}/config.json", f"{sub}/{stem}.safetensors",
                     f"{sub}/{stem}.safetensors.index.json",
                     f"{sub}/{stem}-?????-of-?????.safetensors"]
    return patterns


@dataclasses.dataclass
class SDPipelineModels:
    """The parts of a Stable Diffusion (+ ControlNet) pipeline, converted."""

    unet: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: SchedulerConfig
    controlnet: nnx.Module | None = None


def check_pipeline_folder(root: Path) -> None:
    """One WeightsError line naming every missing or mismatched component subfolder."""
    if not root.is_dir():
        raise WeightsError(f"{root}: pipeline folder does not exist")
    problems = []
    for sub, (stem, cls) in MODEL_COMPONENTS.items():
        if not (root / sub / "config.json").is_file():
            problems.append(f"missing {sub}/ (expected a {cls}: config.json + {stem}.safetensors)")
            continue
        name = model_class(read_config(root / sub)).__name__
        if name != cls:
            problems.append(f"{sub}/ holds a {name} (expected a {cls})")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
            or (tok / "tokenizer.json").is_file()):
        problems.append("missing tokenizer/ (expected a CLIPTokenizer: vocab.json + merges.txt)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        problems.append("missing scheduler/ (expected scheduler_config.json)")
    if problems:
        raise WeightsError(f"{root}: not a usable Stable Diffusion pipeline folder: "
                           f"{'; '.join(problems)}")


def _check_compatible(models: dict[str, nnx.Module], what: str) -> None:
    """The UNet (and ControlNet) must cross-attend to the text encoder's hidden size."""
    hidden = models["text_encoder"].final_layer_norm.weight.shape[0]
    for name in ("unet", "controlnet"):
        if name in models and models[name].cfg.cross_attention_dim != hidden:
            raise WeightsError(f"{what}: {name} cross_attention_dim "
                               f"{models[name].cfg.cross_attention_dim} != text_encoder "
                               f"hidden_size {hidden}")


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def load_tokenizer(folder: Path):
    from freeanimate_jax.platform import no_torch_advice

    with no_torch_advice():
        from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise WeightsError(f"{folder}: CLIPTokenizer could not be loaded "
                           f"({_first_line(e)})") from e


def load_scheduler(root: Path) -> SchedulerConfig:
    try:
        return SchedulerConfig.from_pretrained(root, "scheduler")
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise WeightsError(f"{root / 'scheduler'}: unusable scheduler config "
                           f"({_first_line(e)})") from e


def load_pipeline(model: str | Path, controlnet: str | Path | None = None, *,
                  dtype=jnp.float32, cache_dir: str | Path | None = None) -> SDPipelineModels:
    """Load a diffusers SD 1.x/2.x pipeline (folder or hub id) and optionally a ControlNet.

    Every model is loaded strictly in `dtype`; `cache_dir` is passed on to `load` (orbax cache
    of the converted models). The tokenizer is transformers' CLIPTokenizer, the scheduler its
    DDIM-relevant config.
    """
    root = resolve_folder(model, allow_patterns=hub_patterns())
    check_pipeline_folder(root)
    cn_folder = None
    if controlnet is not None:
        cn_folder = resolve_folder(controlnet)
        if (name := model_class(read_config(cn_folder)).__name__) != "ControlNetModel":
            raise WeightsError(f"{cn_folder}: holds a {name}, not a ControlNetModel")
    # The cheap parts first: a bad tokenizer or scheduler fails before any conversion.
    tokenizer, scheduler = load_tokenizer(root / "tokenizer"), load_scheduler(root)
    models = {sub: load(root, sub, dtype=dtype, cache_dir=cache_dir) for sub in MODEL_COMPONENTS}
    if cn_folder is not None:
        models["controlnet"] = load(cn_folder, dtype=dtype, cache_dir=cache_dir)
    _check_compatible(models, str(root))
    return SDPipelineModels(**models, tokenizer=tokenizer, scheduler=scheduler)
