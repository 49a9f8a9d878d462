"""Training settings: typed, frozen sections of the `freeanimate train` runbook. Free of JAX
(the command line validates a runbook before any device work). Defaults are the original
AnimateDiff motion-module recipe (SD1.5 frozen, motion modules zero-initialised, linear betas,
AdamW 1e-4, clip 1.0, caption dropout 0.1, 16 frames at stride 4, 256 px, batch 4 per chip).
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional  # noqa: UP035 (omegaconf 2.3 wants typing's)

DATA_SOURCES = ("frames", "bytes", "synthetic", "latents", "toy")
SCHEDULES = ("constant", "cosine", "linear")
REMAT = ("none", "full", "dots_no_batch")
PREDICTIONS = ("epsilon", "v_prediction")
LAYOUTS = ("v1", "v2", "v3", "none")
STATE_SHARDING = ("replicate", "data", "auto")
OBJECTIVES = ("diffusion", "vae")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # frames | bytes (raw mp4) | synthetic | latents (the latent cache) | toy (the toy world,
    # `freeanimate_jax.toy`: synthetic_videos clips of synthetic_frames frames)
    source: str = "frames"
    dir: str = ""  # where the prepared dataset (or the latent cache) lives
    manual_dir: str = ""  # prepare-data: the WebVid-layout folder (results.csv + videos)
    frames: int = 16
    stride: int = 4
    hflip: bool = True
    caption_dropout: float = 0.1
    synthetic_videos: int = 64  # the synthetic config's size
    synthetic_frames: int = 24


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """The training noise (the tables are `train.objective.alphas`)."""

    beta_schedule: str = "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    snr_gamma: Optional[float] = None  # noqa: UP045  Min-SNR-gamma; null: off
    offset: float = 0.0  # per-video offset noise, shared by a clip's frames
    zero_terminal_snr: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    schedule: str = "constant"  # after warmup: constant | cosine | linear (to end_lr_factor)
    warmup_steps: int = 0
    decay_steps: int = 0  # cosine/linear length after warmup; 0 = until train.max_steps
    end_lr_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # global norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step (the batch is split into them)
    ema_decay: Optional[float] = None  # noqa: UP045  EMA of the trained weights; null: off


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    trainable: str = "motion_modules"  # regex searched in each parameter's dotted path
    # diffusion: the UNet (or ControlNet) learns to denoise; vae: the VAE learns to
    # reconstruct frames, MSE + kl_weight x KL (`train.objective`; pixels only, no text)
    objective: str = "diffusion"
    # Weight of the posterior's KL to N(0, I), summed per image, against the per-pixel MEAN
    # squared error. SD's 1e-6 weighs a per-image SUM of errors, so the same number here is
    # H x W x 3 times stronger than SD's (12,288x at 64x64).
    kl_weight: float = 1e-6
    # Layout of a new module (when motion_module is empty): v1 | v2 | v3; none: no motion
    # module, frames train as images (AnimateDiff's image stage, ControlNet training).
    motion: str = "v3"
    norm_per_frame: bool = True  # GroupNorm per frame, as the released SD1.5 modules
    batch_per_chip: int = 4
    global_batch: Optional[int] = None  # noqa: UP045  null: batch_per_chip x chips
    max_steps: int = 100_000
    seed: int = 0
    remat: str = "none"  # per block: none | full | dots_no_batch
    # The trained weights, optimizer state and EMA: a full copy per chip (replicate), or each
    # leaf's largest divisible dimension sharded over `data` (ZeRO / FSDP-style); auto: shard
    # when a replicated copy would take over a quarter of a chip's memory (analytic, no compile).
    state_sharding: str = "auto"
    output_dir: str = "runs/motion"
    ckpt_every: int = 1000
    ckpt_keep: int = 3
    ckpt_async: bool = True
    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False


@dataclasses.dataclass(frozen=True)
class ValConfig:
    every: int = 5000  # 0: no validation
    prompts: List[str] = dataclasses.field(  # noqa: UP006
        default_factory=lambda: ["a red square moving left"])
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0])  # noqa: UP006
    steps: int = 25
    guidance: float = 8.0
    frames: int = 16


def check(data: DataConfig, noise: NoiseConfig, optim: OptimConfig, loop: LoopConfig,
          val: ValConfig) -> None:
    """ValueError naming the key and what was expected, for values no type check catches."""
    def need(ok: bool, key: str, value, expected: str) -> None:
        if not ok:
            raise ValueError(f"{key}={value!r}; expected {expected}")

    need(data.source in DATA_SOURCES, "data.source", data.source, " | ".join(DATA_SOURCES))
    need(data.frames >= 1, "data.frames", data.frames, "at least 1")
    need(data.stride >= 1, "data.stride", data.stride, "at least 1")
    need(0 <= data.caption_dropout <= 1, "data.caption_dropout", data.caption_dropout,
         "a probability in [0, 1]")
    need(noise.prediction_type in PREDICTIONS, "noise.prediction_type", noise.prediction_type,
         " | ".join(PREDICTIONS))
    need(noise.snr_gamma is None or noise.snr_gamma > 0, "noise.snr_gamma", noise.snr_gamma,
         "a positive number or null")
    need(math.isfinite(optim.lr) and optim.lr > 0, "optim.lr", optim.lr,
         "a positive finite number")
    need(optim.schedule in SCHEDULES, "optim.schedule", optim.schedule, " | ".join(SCHEDULES))
    need(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "0 or more")
    need(optim.grad_accum >= 1, "optim.grad_accum", optim.grad_accum, "at least 1")
    need(optim.grad_clip >= 0, "optim.grad_clip", optim.grad_clip, "0 (off) or more")
    need(optim.ema_decay is None or 0 < optim.ema_decay < 1, "optim.ema_decay",
         optim.ema_decay, "a number in (0, 1) or null")
    need(loop.motion in LAYOUTS, "train.motion", loop.motion, " | ".join(LAYOUTS))
    need(loop.objective in OBJECTIVES, "train.objective", loop.objective,
         " | ".join(OBJECTIVES))
    need(loop.kl_weight >= 0, "train.kl_weight", loop.kl_weight, "0 or more")
    need(loop.objective != "vae" or (loop.motion == "none" and data.source != "latents"),
         "train.objective", loop.objective,
         "vae with train.motion=none and pixel data (not data.source=latents)")
    need(loop.objective != "vae" or val.every == 0, "val.every", val.every,
         "0 with train.objective=vae (validation samples videos; a VAE run has no sampler)")
    need(loop.remat in REMAT, "train.remat", loop.remat, " | ".join(REMAT))
    need(loop.state_sharding in STATE_SHARDING, "train.state_sharding", loop.state_sharding,
         " | ".join(STATE_SHARDING))
    need(loop.batch_per_chip >= 1, "train.batch_per_chip", loop.batch_per_chip, "at least 1")
    need(loop.global_batch is None or loop.global_batch >= 1, "train.global_batch",
         loop.global_batch, "at least 1, or null")
    need(loop.max_steps >= 1, "train.max_steps", loop.max_steps, "at least 1")
    need(loop.ckpt_every >= 1, "train.ckpt_every", loop.ckpt_every, "at least 1")
    need(loop.ckpt_keep >= 1, "train.ckpt_keep", loop.ckpt_keep, "at least 1")
    need(loop.log_every >= 1, "train.log_every", loop.log_every, "at least 1")
    need(bool(loop.output_dir), "train.output_dir", loop.output_dir, "a folder")
    need(val.every >= 0, "val.every", val.every, "0 (off) or more")
    need(len(val.seeds) >= 1 and len(val.prompts) >= 1, "val.prompts/seeds",
         (val.prompts, val.seeds), "at least one of each")
