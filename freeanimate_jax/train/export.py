"""`freeanimate train export`: what a run trained, through the existing exporters. A motion
module as a diffusers MotionAdapter folder or an original-layout `.safetensors` (motion keys
only, the GroupNorm mode it was trained with recorded beside them); a ControlNet, or a UNet
trained as an image model (`train.motion=none`), as a diffusers model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from freeanimate_jax.data.errors import DataError
from freeanimate_jax.train import checkpoint
from freeanimate_jax.train.state import path_name


def _motion_only(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if ".motion_modules." in f".{k}"}


def _checkpoint(run: str | Path, step: int | None) -> tuple[checkpoint.Checkpoints, int]:
    folder = Path(run).expanduser() / "checkpoints"
    if not folder.is_dir():
        raise DataError(f"{run}: no checkpoints folder; expected a train.output_dir with "
                        f"checkpoints")
    ckpt = checkpoint.Checkpoints(folder, keep=1000, asynchronous=False)
    steps = ckpt.steps()
    step = steps[-1] if step is None and steps else step
    if step is None or step not in steps:
        ckpt.close()
        raise DataError(f"{run}: no complete checkpoint{'' if step is None else f' {step}'}; "
                        f"expected one of {steps or 'none'}")
    return ckpt, step


def saved_params(run: str | Path, *, step: int | None = None, ema: bool = False
                 ) -> tuple[dict[str, Any], dict]:
    """The trained parameters of a run's checkpoint (`step`, default the latest) by dotted
    name, fp32, and its record."""
    ckpt, step = _checkpoint(run, step)
    try:
        record = ckpt.record(step)
        raw = ckpt.read(step, "ema" if ema else "params")
    finally:
        ckpt.close()
    return ({path_name(p): jnp.asarray(v, jnp.float32)
             for p, v in jax.tree_util.tree_leaves_with_path(raw)}, record)


def _load_into(model: nnx.Module, saved: dict[str, Any], run: str | Path, what: str) -> None:
    """Set `model`'s parameters from `saved` (names relative to `model`); all must be there."""
    target = nnx.state(model, nnx.Param)
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(target)]
    missing = [n for n in names if n not in saved]
    if missing:
        raise DataError(f"{run}: the checkpoint lacks {len(missing)} {what} parameters (e.g. "
                        f"{missing[0]}); expected a run that trained the {what}")
    leaves = [saved[n] for n in names]
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(target), leaves))


def trained_kind(saved: dict[str, Any], record: dict[str, Any]) -> str:
    """What a run trained: "controlnet", "motion" (motion modules only), "vae" or "unet";
    the VAE by the run's recorded objective, the rest by what its trained names hold."""
    if record.get("objective") == "vae":
        return "vae"
    if any(k.startswith("controlnet.") for k in saved):
        return "controlnet"
    if all(".motion_modules." in f".{k}" for k in saved):
        return "motion"
    return "unet"


def adapter_from_run(run: str | Path, *, step: int | None = None, ema: bool = False
                     ) -> tuple[nnx.Module, dict]:
    """The MotionAdapter a run trained (its config from the checkpoint's record, its weights
    from the checkpoint), and that record."""
    from freeanimate_jax.models.motion import MotionAdapter, MotionConfig
    from freeanimate_jax.weights.loader import FrozenConfig

    saved, record = saved_params(run, step=step, ema=ema)
    if not record.get("adapter_config"):
        raise DataError(f"{run}: the run trained no motion module (trainable "
                        f"{record.get('trainable')!r}); expected a motion-module run")
    config = dict(record["adapter_config"])
    cfg = MotionConfig.from_dict(config, norm_per_frame=record["norm_per_frame"])
    adapter = MotionAdapter(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    adapter.config = FrozenConfig(config)
    _load_into(adapter, _motion_only(saved), run, "motion")
    return adapter, record


def model_from_run(run: str | Path, *, step: int | None = None, ema: bool = False
                   ) -> tuple[nnx.Module, dict, str]:
    """A ControlNet or image UNet a run trained, whole: the run's own model rebuilt from its
    recorded job (the frozen parts from the base), its trained parameters from the checkpoint.
    Returns (model, its diffusers config, kind)."""
    from freeanimate_jax import config as cfg
    from freeanimate_jax.train.loop import build_models
    from freeanimate_jax.train.state import split

    saved, record = saved_params(run, step=step, ema=ema)
    kind = trained_kind(saved, record)
    if kind == "motion":
        raise DataError(f"{run}: the run trained a motion module; export it with the motion "
                        f"layouts (diffusers | original)")
    job = cfg.load_job(None, [], base=record["config"], schema=cfg.TrainJob)
    models = build_models(job, jnp.float32)
    if kind == "unet" and models.adapter is not None:
        raise DataError(f"{run}: the run trained UNet layers with a motion module inserted; "
                        f"expected train.motion=none to export an image UNet")
    model = models.trained_model
    _, trained, _ = split(model, record["trainable"])
    flat = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(trained)}
    unknown = sorted(set(saved) - set(flat))
    if unknown:
        raise DataError(f"{run}: the checkpoint holds {unknown[0]}, not in the rebuilt model; "
                        f"expected the base it was trained from")
    for name, value in saved.items():  # the trained values over the rebuilt ones
        flat[name] = value
    leaves = [flat[path_name(p)] for p, _ in jax.tree_util.tree_leaves_with_path(trained)]
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(trained), leaves))
    part = {"controlnet": models.controlnet, "vae": models.vae}.get(kind, models.unet)
    config = dict(part.config)
    if kind == "vae":
        config["scaling_factor"] = latent_scale(part, job)
    return part, config, kind


def latent_scale(vae: nnx.Module, job: Any, frames: int = 256) -> float:
    """1 / std of the posterior means over the run's first `frames` training frames (stored
    at the training size): the factor that gives the diffusion model unit-variance latents,
    as SD's 0.18215 was chosen (LDM measured posterior samples; with a narrow posterior the
    two agree closely)."""
    import numpy as np

    from freeanimate_jax.train.data import source_of

    source = source_of(job)
    picked: list = []
    for i in range(len(source)):
        row = source[i]
        if "frames" not in row:
            raise DataError(f"data.source={job.sections()[0].source} stores no decoded frames; "
                            f"expected toy, synthetic or frames data to estimate the VAE's "
                            f"latent scale from")
        picked.extend(np.asarray(row["frames"]))
        if len(picked) >= frames:
            break
    x = jnp.asarray(np.stack(picked[:frames]), jnp.float32) / 127.5 - 1.0
    mean, _ = nnx.jit(lambda v, x: v.encode(x, chunk=16))(vae, x)
    return float(1.0 / jnp.std(mean))


def export_run(run: str | Path, out: str | Path, *, layout: str = "diffusers",
               step: int | None = None, ema: bool = False, overwrite: bool = False) -> Path:
    """Write what the run trained to `out` (see the module doc); returns the path."""
    from freeanimate_jax.weights.export import (
        export_model_folder,
        export_motion_adapter,
        export_original,
    )

    saved, record = saved_params(run, step=step, ema=ema)
    kind = trained_kind(saved, record)
    if kind != "motion":
        if layout != "diffusers":
            raise DataError(f"--layout {layout} is for motion modules; this run trained a "
                            f"{kind}; expected --layout diffusers")
        model, config, _ = model_from_run(run, step=step, ema=ema)
        return export_model_folder(model, config, out, overwrite=overwrite)
    adapter, _ = adapter_from_run(run, step=step, ema=ema)
    if layout == "original":
        return export_original(adapter, out, overwrite=overwrite)
    return export_motion_adapter(adapter, out, overwrite=overwrite)
