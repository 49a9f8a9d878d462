"""The model set of a job, assembled: base SD family (+ ControlNet), LoRAs, AnimateDiff's
domain adapter and motion module. Library code, free of the command line (which calls it), so
notebooks and scripts can assemble a job's models the same way.

Order: local LoRA files are checked and the motion module loaded first, so a wrong one fails
before a multi-GB download of the base; then the base (a diffusers folder or hub id, a
single-file checkpoint, or the built-in tiny family), scheduler overrides, SD LoRAs, the domain
adapter (a LoRA on the UNet's spatial layers) and finally the motion module (its motion LoRAs
merged first) inserted into the UNet, which makes it a UNetMotionModel.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from freeanimate_jax import config as cfg
from freeanimate_jax.config import MOTION_EXPECTED, Job
from freeanimate_jax.weights.errors import WeightsError


@contextlib.contextmanager
def weights_errors(expected: str, what: str = "") -> Iterator[None]:
    """A WeightsError as one line, prefixed with `what`, ending in `; expected ...`."""
    try:
        yield
    except WeightsError as e:
        text = " ".join(str(e).split())
        tail = "" if "; expected" in text else f"; expected {expected}"
        raise WeightsError(f"{what + ': ' if what else ''}{text}{tail}") from None


def _load_base(job: Job, dtype: Any) -> Any:
    if job.model == cfg.TINY_MODEL:
        from freeanimate_jax.demo import tiny_models

        models = tiny_models(0, dtype=dtype)
        models.controlnet = models.controlnet if job.controlnet else None
        return models
    from freeanimate_jax.weights.pipeline import load_pipeline

    cache = job.weights_cache or None
    if not Path(job.model).expanduser().is_file():
        return load_pipeline(job.model, controlnet=job.controlnet or None, dtype=dtype,
                             cache_dir=cache)
    from freeanimate_jax.weights import single_file
    from freeanimate_jax.weights.loader import load

    models = single_file.load_single_file(job.model, dtype=dtype)
    if job.controlnet:
        models.controlnet = load(job.controlnet, dtype=dtype, cache_dir=cache)
        if (name := type(models.controlnet).__name__) != "ControlNetModel":
            raise WeightsError(f"{job.controlnet}: holds a {name}, not a ControlNetModel")
    return models


def _load_motion(job: Job, dtype: Any) -> Any:
    from freeanimate_jax.weights.motion import load_motion_module, merge_lora

    with weights_errors(MOTION_EXPECTED, "motion_module"):
        if job.motion_module == cfg.TINY_MODEL:
            from freeanimate_jax.demo import tiny_motion_adapter

            adapter = tiny_motion_adapter(dtype=dtype)
        else:
            adapter = load_motion_module(job.motion_module, dtype=dtype)
    for spec in job.motion_lora:
        path, scale = cfg.parse_weighted(spec)
        with weights_errors("a motion LoRA for this motion module", f"motion_lora {path}"):
            merge_lora(adapter, path, scale, target="motion")
    return adapter


def toy_paths(job: Job) -> Job:
    """`job` with `builtin:toy` replaced by the shipped toy family's folders (pipeline,
    controlnet/, motion_adapter/), after checking every shipped file's SHA-256."""
    parts = {"model": "", "controlnet": "controlnet", "motion_module": "motion_adapter"}
    if not any(getattr(job, k) == cfg.TOY_MODEL for k in parts):
        return job
    from freeanimate_jax.toy.family import verify

    root = verify()
    return dataclasses.replace(job, **{k: str(root / sub) for k, sub in parts.items()
                                       if getattr(job, k) == cfg.TOY_MODEL})


def fetch_hub_files(job: Job) -> Job:
    """`job` with every `hf://owner/repo/path` file (LoRAs, motion LoRAs, domain adapter, a
    motion-module or single-file base file) downloaded and replaced by its cached path."""
    from freeanimate_jax.weights.loader import HUB_FILE, resolve_file

    def local(spec: str, key: str) -> str:
        path, scale = cfg.parse_weighted(spec)
        if not path.startswith(HUB_FILE):
            return spec
        fetched = str(resolve_file(path, key))
        return fetched if spec == path else f"{fetched}:{scale}"

    return dataclasses.replace(
        job, lora=[local(s, "lora") for s in job.lora],
        motion_lora=[local(s, "motion_lora") for s in job.motion_lora],
        domain_adapter=local(job.domain_adapter, "domain_adapter") if job.domain_adapter
        else "",
        motion_module=str(resolve_file(job.motion_module, "motion_module"))
        if job.motion_module.startswith(HUB_FILE) else job.motion_module,
        model=str(resolve_file(job.model, "model")) if job.model.startswith(HUB_FILE)
        else job.model)


def load_models(job: Job, dtype: Any) -> Any:
    """The job's models: the SD family (+ ControlNet) with its LoRAs and domain adapter merged,
    and with a motion module the UNet made a UNetMotionModel (motion LoRAs merged first)."""
    from freeanimate_jax.models.motion import UNetMotionModel
    from freeanimate_jax.weights import lora
    from freeanimate_jax.weights.motion import merge_lora

    job = fetch_hub_files(toy_paths(job))
    # Local files and the motion module first: a wrong one fails before SD's download.
    local = [("lora", s) for s in job.lora] + [("motion_lora", s) for s in job.motion_lora]
    if job.domain_adapter:
        local.append(("domain_adapter", job.domain_adapter))
    for key, spec in local:
        if not Path(path := cfg.parse_weighted(spec)[0]).expanduser().exists():
            raise WeightsError(f"{key}: {path}: no such file; expected a local LoRA file "
                               f"or a hub file hf://owner/repo/path/in/repo.ext")
    adapter = _load_motion(job, dtype) if job.motion_module else None
    with weights_errors("a diffusers SD 1.x folder or hub id, or a single-file SD 1.x "
                        "checkpoint (and a ControlNet folder or hub id)"):
        models = _load_base(job, dtype)
    if overrides := job.scheduler_overrides():  # validated with the job
        models.scheduler = dataclasses.replace(models.scheduler, **overrides)
    for spec in job.lora:
        with weights_errors("a LoRA for this Stable Diffusion 1.x model", "lora"):
            lora.merge_lora(models, *cfg.parse_weighted(spec))
    if job.domain_adapter:
        path, scale = cfg.parse_weighted(job.domain_adapter)
        with weights_errors("AnimateDiff v3's domain adapter (a spatial LoRA for SD 1.5)",
                            f"domain_adapter {path}"):
            merge_lora(models.unet, path, scale, target="spatial")
    if adapter is not None:
        try:
            models.unet = UNetMotionModel.from_unet2d(models.unet, adapter)
        except ValueError as e:
            raise WeightsError(f"motion_module {job.motion_module}: {e}; expected "
                               f"{MOTION_EXPECTED}") from None
    return models
