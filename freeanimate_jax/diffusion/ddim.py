"""DDIM sampling and DDIM inversion as pure jnp functions, matching diffusers' DDIM schedulers.

The noise tables are built once on the host in NumPy (bit-exact with diffusers on the CPU) and
carried in a small pytree, `DDIMTables`. The step functions only index into those tables, so the
timestep may be a traced int32 and a whole sampling loop can live inside `jax.lax.scan`.
Arrays may have any layout: the update is elementwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig  # re-exported

Array = jax.Array


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # float32 fused multiply-add, correctly rounded: torch's CPU linspace kernel is compiled with
    # FMA contraction. a*b is exact in float64; the sum is rounded to odd so that the final
    # rounding to float32 is correct (no double rounding).
    a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    fix = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(start, end, n, dtype=float32) on the CPU, bit for bit: float32 step, the
    # first half counted up from `start`, the second half down from `end`.
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n)
    up = _fma_f32(step, i.astype(np.float32), s)
    down = _fma_f32(-step, (n - 1 - i).astype(np.float32), e)
    return np.where(i < n // 2, up, down)


def _cumprod(x: np.ndarray) -> np.ndarray:
    # torch.cumprod on the CPU accumulates float32 in float64 and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023, Algorithm 1, in float32 as diffusers does it.
    sqrt_ab = np.sqrt(_cumprod(np.float32(1) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return np.float32(1) - alphas


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """float32 (num_train_timesteps,), equal bit for bit to diffusers' `alphas_cumprod` built by
    torch on the CPU, so that parity tests compare the step math and nothing else."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    else:
        betas = np.square(_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n))
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod(np.float32(1) - betas)


def _check_steps(cfg: SchedulerConfig, n: int) -> None:
    if not 1 <= n <= cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps={n} must be in [1, {cfg.num_train_timesteps}]")


def timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """Descending int64 timesteps, as `DDIMScheduler.set_timesteps` makes them."""
    n, big_t = num_inference_steps, cfg.num_train_timesteps
    _check_steps(cfg, n)
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64)
        return ts + cfg.steps_offset
    return np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1


def inverse_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """Ascending int64 timesteps, as `DDIMInverseScheduler.set_timesteps` makes them."""
    n, big_t = num_inference_steps, cfg.num_train_timesteps
    _check_steps(cfg, n)
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round().astype(np.int64) + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(big_t, 0, -big_t / n)[::-1]).astype(np.int64) - 1
    raise ValueError("DDIM inversion: unsupported timestep_spacing="
                     f"{cfg.timestep_spacing!r}; diffusers supports only 'leading', 'trailing'")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMTables:
    """Everything a step needs. Arrays are pytree leaves; the config and step count are static
    metadata, so they pick the code path at trace time and jit caches on them."""

    alphas_cumprod: Array  # float32 (num_train_timesteps,)
    final_alpha_cumprod: Array  # float32 (): alpha "before" t=0 when sampling
    initial_alpha_cumprod: Array  # float32 (): alpha "before" the first inversion step
    cfg: SchedulerConfig = dataclasses.field(metadata={"static": True})
    num_inference_steps: int = dataclasses.field(metadata={"static": True})

    @property
    def step_size(self) -> int:
        """diffusers' gap between a step's timesteps, whatever the timestep spacing."""
        return self.cfg.num_train_timesteps // self.num_inference_steps


def make_tables(cfg: SchedulerConfig, num_inference_steps: int) -> DDIMTables:
    """Builds the tables once, on the host, for a given number of sampling steps."""
    _check_steps(cfg, num_inference_steps)
    ts = timesteps(cfg, num_inference_steps)
    if ts.max() >= cfg.num_train_timesteps:  # diffusers fails on the first step; jnp would clamp
        raise ValueError(f"timestep {ts.max()} (steps_offset={cfg.steps_offset}) is outside "
                         f"[0, {cfg.num_train_timesteps})")
    ac = alphas_cumprod(cfg)
    edge = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    return DDIMTables(jnp.asarray(ac), jnp.asarray(edge), jnp.asarray(edge), cfg,
                      num_inference_steps)


def _alpha_at(tables: DDIMTables, t: Array, fallback: Array) -> Array:
    # alphas_cumprod[t] for t >= 0, else the fallback: jnp.where keeps it traceable.
    return jnp.where(t >= 0, tables.alphas_cumprod[jnp.maximum(t, 0)], fallback)


def _x0_and_eps(cfg: SchedulerConfig, alpha_t: Array, model_output: Array, sample: Array
                ) -> tuple[Array, Array]:
    # Predicted clean sample (clipped if configured) and noise (never clipped, as diffusers).
    sa, sb = jnp.sqrt(alpha_t), jnp.sqrt(1 - alpha_t)
    if cfg.prediction_type == "epsilon":
        x0, eps = (sample - sb * model_output) / sa, model_output
    elif cfg.prediction_type == "sample":
        x0, eps = model_output, (sample - sa * model_output) / sb
    else:
        x0, eps = sa * sample - sb * model_output, sa * model_output + sb * sample
    if cfg.clip_sample:
        x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    return x0, eps


def ddim_step(tables: DDIMTables, model_output: Array, t: Array | int, sample: Array, *,
              eta: float | Array = 0.0, noise: Array | None = None) -> Array:
    """x_t -> x_{t - step_size} (`DDIMScheduler.step(...).prev_sample`).

    `noise` (standard normal, shaped like `sample`) is drawn by the caller so the function stays
    pure; it must be given whenever eta may be nonzero. The result has `sample`'s dtype.
    """
    if noise is None and isinstance(eta, (int, float)) and eta > 0:
        raise ValueError("ddim_step: eta > 0 needs `noise`")
    t = jnp.asarray(t, jnp.int32)
    prev_t = t - tables.step_size
    alpha_t = tables.alphas_cumprod[t]
    alpha_prev = _alpha_at(tables, prev_t, tables.final_alpha_cumprod)
    x0, eps = _x0_and_eps(tables.cfg, alpha_t, model_output, sample)
    variance = ((1 - alpha_prev) / (1 - alpha_t)) * (1 - alpha_t / alpha_prev)
    std = eta * jnp.sqrt(variance)
    prev = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev - std**2) * eps
    if noise is not None:
        prev = prev + std * noise
    return prev.astype(sample.dtype)


def ddim_inverse_step(tables: DDIMTables, model_output: Array, t: Array | int, sample: Array
                      ) -> Array:
    """x_{t - step_size} -> x_t (`DDIMInverseScheduler.step(...).prev_sample`), for the
    ascending `inverse_timesteps`: the model output is evaluated at the *target* timestep t."""
    t = jnp.asarray(t, jnp.int32)
    src_t = jnp.minimum(t - tables.step_size, tables.cfg.num_train_timesteps - 1)
    alpha_src = _alpha_at(tables, src_t, tables.initial_alpha_cumprod)
    alpha_t = tables.alphas_cumprod[t]
    x0, eps = _x0_and_eps(tables.cfg, alpha_src, model_output, sample)
    return (jnp.sqrt(alpha_t) * x0 + jnp.sqrt(1 - alpha_t) * eps).astype(sample.dtype)


def _sqrt_alphas(tables_or_alphas: DDIMTables | Array | np.ndarray, t: Array | int, like: Array
                 ) -> tuple[Array, Array]:
    # sqrt(alpha_t), sqrt(1 - alpha_t) in `like`'s dtype, a per-example t broadcast over dim 0.
    ac = (tables_or_alphas.alphas_cumprod if isinstance(tables_or_alphas, DDIMTables)
          else jnp.asarray(tables_or_alphas))
    a = ac.astype(like.dtype)[jnp.asarray(t)].reshape((-1,) + (1,) * (like.ndim - 1))
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def add_noise(tables_or_alphas: DDIMTables | Array | np.ndarray, x0: Array, noise: Array,
              t: Array | int) -> Array:
    """Forward diffusion q(x_t | x_0) (`DDIMScheduler.add_noise`), for training and for
    re-noising; `t` is a scalar or one timestep per example along the leading axis."""
    sa, sb = _sqrt_alphas(tables_or_alphas, t, x0)
    return sa * x0 + sb * noise


def velocity(tables_or_alphas: DDIMTables | Array | np.ndarray, x0: Array, noise: Array,
             t: Array | int) -> Array:
    """The v-prediction training target (`DDIMScheduler.get_velocity`)."""
    sa, sb = _sqrt_alphas(tables_or_alphas, t, x0)
    return sa * noise - sb * x0
