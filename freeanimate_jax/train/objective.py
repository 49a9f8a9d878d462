"""The diffusion training objective, pure: noise tables, targets, loss weights, the loss.

AnimateDiff's motion training uses DDPM noise with *linear* betas 0.00085 -> 0.012 over 1000
steps (not SD's scaled_linear), uniform timesteps and epsilon prediction. The tables come from
`diffusion.ddim.alphas_cumprod`, so training and validation sampling share one schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from freeanimate_jax.diffusion import ddim
from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig
from freeanimate_jax.train.settings import PREDICTIONS, NoiseConfig

Array = jax.Array


def scheduler(noise: NoiseConfig) -> SchedulerConfig:
    """The DDIM config that samples with this training schedule (validation)."""
    return SchedulerConfig(
        num_train_timesteps=noise.num_train_timesteps, beta_start=noise.beta_start,
        beta_end=noise.beta_end, beta_schedule=noise.beta_schedule, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=noise.prediction_type,
        rescale_betas_zero_snr=noise.zero_terminal_snr)


def alphas(noise: NoiseConfig) -> np.ndarray:
    """alphas_cumprod (T,), float32, bit-equal to diffusers' DDPMScheduler's."""
    return ddim.alphas_cumprod(scheduler(noise))


def snr(alphas_cumprod: Array, t: Array) -> Array:
    """Signal-to-noise ratio alpha_t / (1 - alpha_t) per timestep, as diffusers'
    `training_utils.compute_snr` (which squares sqrt(alpha) / sqrt(1 - alpha))."""
    a = jnp.asarray(alphas_cumprod)[t]
    return (jnp.sqrt(a) / jnp.sqrt(1.0 - a)) ** 2


def loss_weights(alphas_cumprod: Array, t: Array, gamma: float | None, prediction: str
                 ) -> Array | None:
    """Min-SNR-gamma per-example weights (diffusers' train_text_to_image recipe): min(SNR,
    gamma) / SNR for epsilon, / (SNR + 1) for v-prediction. None: unweighted."""
    if gamma is None:
        return None
    s = snr(alphas_cumprod, t)
    clipped = jnp.minimum(s, gamma)
    return clipped / (s + 1.0) if prediction == "v_prediction" else clipped / s


def target(alphas_cumprod: Array, x0: Array, noise: Array, t: Array, prediction: str) -> Array:
    """What the model learns to predict: the noise, or the velocity (`get_velocity`)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return ddim.velocity(alphas_cumprod, x0, noise, t)
    raise ValueError(f"prediction_type={prediction!r}; expected one of {PREDICTIONS}")


def video_noise(key: Array, shape: tuple[int, ...], offset: float) -> Array:
    """Gaussian noise for videos (B, F, h, w, c); with `offset`, plus offset x N(0, 1) per video
    and channel, shared by its frames (a per-frame offset would be flicker, the very thing a
    motion module learns to remove)."""
    k_noise, k_offset = jax.random.split(key)
    eps = jax.random.normal(k_noise, shape, jnp.float32)
    if offset:
        b, c = shape[0], shape[-1]
        eps = eps + offset * jax.random.normal(k_offset, (b, 1, 1, 1, c), jnp.float32)
    return eps


def mse(pred: Array, tgt: Array, weights: Array | None) -> Array:
    """fp32 mean squared error; with weights, the per-example means weighted (diffusers:
    mean over non-batch dims, times the weight, then mean over the batch)."""
    err = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
    if weights is None:
        return jnp.mean(err)
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return jnp.mean(per_example * weights)
