"""Periodic validation: fixed prompts and seeds sampled through the shared sampling core
(`pipelines.Generate`) with the training noise schedule, written as a video and a contact
sheet, and a motion score, because the loss alone hides whether motion is learned (the loss is
dominated by per-frame denoising)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from freeanimate_jax.io.sheet import contact_sheet
from freeanimate_jax.io.video import write_json_atomic, write_png_atomic, write_video


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, pixels in [0, 1] (0: a still)."""
    f = np.asarray(frames, np.float32)
    if f.dtype == np.uint8 or f.max() > 1.5:
        f = f / 255.0
    return float(np.mean(np.abs(np.diff(f, axis=0)))) if len(f) > 1 else 0.0


def sample(trainer: Any, prompt: str, seed: int, *, ema: bool = False,
           model: Any = None) -> np.ndarray:
    """One validation video (F, H, W, 3) in [0, 1] from the trainer's current weights (or
    `model`, a `trainer.merged()` already made)."""
    from freeanimate_jax.pipelines.generate import Generate
    from freeanimate_jax.pipelines.settings import GenerateSettings
    from freeanimate_jax.train.objective import scheduler
    from freeanimate_jax.weights.pipeline import SDPipelineModels

    m, val = trainer.models, trainer.val
    merged = trainer.merged(ema) if model is None else model
    unet, controlnet = (merged.unet, merged.controlnet) if trainer.controlled else (merged, None)
    models = SDPipelineModels(unet=unet, vae=m.vae, text_encoder=m.text_encoder,
                              tokenizer=m.tokenizer, scheduler=scheduler(trainer.noise),
                              controlnet=controlnet)
    # A ControlNet is validated on the control images of the first training clip.
    poses = trainer.val_condition if trainer.controlled else None
    frames = val.frames if poses is None else len(poses)
    settings = GenerateSettings(frames=frames, steps=val.steps, guidance_scale=val.guidance,
                                seed=seed)
    size = trainer.job.size_hw
    return np.asarray(Generate(models, settings)(prompt, size, poses=poses).frames, np.float32)


def validate(trainer: Any, step: int) -> dict[str, Any] | None:
    """Sample every (prompt, seed), write `val/step_N/` (videos, sheet, scores); the scores
    (None on the processes other than 0 of a multi-host run)."""
    folder = trainer.out / "val" / f"step_{step:07d}"
    ema = trainer.optim.ema_decay is not None
    model = trainer.merged(ema)  # on every process: a multi-host run gathers its state
    if jax.process_index() != 0:
        return None  # process 0 samples and writes
    videos, scores = {}, {}
    for i, prompt in enumerate(trainer.val.prompts):
        for seed in trainer.val.seeds:
            frames = sample(trainer, prompt, seed, model=model)
            name = f"p{i}_s{seed}"
            write_video(folder / f"{name}.mp4", frames, trainer.job.fps)
            videos[name] = frames
            scores[name] = motion_score(frames)
    write_png_atomic(folder / "sheet.png", contact_sheet(videos, rows=min(4, trainer.val.frames)))
    result = {"step": step, "motion_score": float(np.mean(list(scores.values()))),
              "per_sample": scores, "prompts": list(trainer.val.prompts),
              "data_motion_score": getattr(trainer, "data_motion", None)}
    write_json_atomic(folder / "scores.json", result)
    trainer.log(f"validation at step {step}: motion score {result['motion_score']:.4f}"
                + (f" (data {result['data_motion_score']:.4f})"
                   if result["data_motion_score"] is not None else ""))
    return result
