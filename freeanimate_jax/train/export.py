"""`freeanimate train export`: a run's trained motion module as a diffusers MotionAdapter
folder or an original-layout `.safetensors`, through the existing exporters; motion keys only,
and the GroupNorm mode the module was trained with recorded beside them."""

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


def adapter_from_run(run: str | Path, *, step: int | None = None, ema: bool = False
                     ) -> tuple[nnx.Module, dict]:
    """The MotionAdapter a run trained (its config from the checkpoint's record, its weights
    from the checkpoint), and that record."""
    from freeanimate_jax.models.motion import MotionAdapter, MotionConfig
    from freeanimate_jax.weights.loader import FrozenConfig

    folder = Path(run).expanduser() / "checkpoints"
    if not folder.is_dir():
        raise DataError(f"{run}: no checkpoints folder; expected a train.output_dir with "
                        f"checkpoints")
    ckpt = checkpoint.Checkpoints(folder, keep=1000, asynchronous=False)
    steps = ckpt.steps()
    step = steps[-1] if step is None and steps else step
    if step is None or step not in steps:
        raise DataError(f"{run}: no complete checkpoint{'' if step is None else f' {step}'}; "
                        f"expected one of {steps or 'none'}")
    record = ckpt.record(step)
    config = dict(record["adapter_config"])
    cfg = MotionConfig.from_dict(config, norm_per_frame=record["norm_per_frame"])
    adapter = MotionAdapter(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    adapter.config = FrozenConfig(config)
    target = nnx.state(adapter, nnx.Param)
    flat_target = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(target)}
    item = "ema" if ema else "params"
    import orbax.checkpoint as ocp

    raw = ckpt.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
    saved = _motion_only({path_name(p): v for p, v in
                          jax.tree_util.tree_leaves_with_path(raw[item])})
    missing = sorted(set(flat_target) - set(saved))
    if missing:
        raise DataError(f"{run}: the checkpoint lacks {len(missing)} motion parameters (e.g. "
                        f"{missing[0]}); expected a run that trained the motion modules")
    leaves = [jnp.asarray(saved[path_name(p)], jnp.float32)
              for p, _ in jax.tree_util.tree_leaves_with_path(target)]
    nnx.update(adapter, jax.tree.unflatten(jax.tree.structure(target), leaves))
    ckpt.close()
    return adapter, record


def export_run(run: str | Path, out: str | Path, *, layout: str = "diffusers",
               step: int | None = None, ema: bool = False, overwrite: bool = False) -> Path:
    from freeanimate_jax.weights.export import export_motion_adapter, export_original

    adapter, _ = adapter_from_run(run, step=step, ema=ema)
    if layout == "original":
        return export_original(adapter, out, overwrite=overwrite)
    return export_motion_adapter(adapter, out, overwrite=overwrite)
