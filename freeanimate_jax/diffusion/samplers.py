"""The samplers AnimateDiff users sample with, beside DDIM: Euler, Euler ancestral, DPM++ 2M
(optionally on Karras sigmas) and LCM, each equal to its diffusers scheduler step for step.

Every one of them is, at step i, two linear maps whose coefficients depend on i alone:

    x0_i   = p[i] * x_i + q[i] * model_output          (clipped to +-range where configured)
    x_i+1  = a[i] * x_i + b[i] * x0_i + c[i] * x0_{i-1} + d[i] * noise_i

so the coefficients are built once on the host in float64 (from diffusers' float32 noise tables,
bit-exact with them: `ddim.alphas_cumprod`) and a step is elementwise arithmetic on scan inputs:
the step index may be traced, the previous x0 (DPM++'s second-order term) is a scan carry, and
the noise is drawn by the caller (pure). The model sees `model_t[i]` (a float: Euler interpolates
between training timesteps) and its input scaled by `in_scale[i]` (Euler's 1 / sqrt(sigma^2 + 1)).

DDIM keeps its own module (`ddim.py`): FreeAnimate inverts with it, and its eta noise and clipped
x0 do not fit the form above. Names follow diffusers' classes (`scheduler_config.SAMPLERS`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from freeanimate_jax.diffusion import ddim
from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig, sampler_kind

Array = jax.Array

NOISY = ("euler_ancestral", "lcm")  # a fresh normal draw every step
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's timestep_scaling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-step coefficients (float32, (steps,)) of one scheduler for one step count."""

    model_t: Array
    in_scale: Array
    p: Array
    q: Array
    a: Array
    b: Array
    c: Array
    d: Array
    kind: str = dataclasses.field(metadata={"static": True})
    clip: float | None = dataclasses.field(metadata={"static": True})  # x0 clip range
    init_noise_sigma: float = dataclasses.field(metadata={"static": True})

    @property
    def steps(self) -> int:
        return int(self.model_t.shape[0])


def _spaced(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """Euler's float32 descending timesteps for diffusers' `timestep_spacing`."""
    big_t = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float32)
        return ts + np.float32(cfg.steps_offset)
    return np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - np.float32(1)


def _dpm_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's int timesteps (lambda_min_clipped = -inf)."""
    big_t = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = big_t // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    return np.arange(big_t, 0, -big_t / n).round().astype(np.int64) - 1


def _karras(sigmas_desc: np.ndarray, n: int) -> np.ndarray:
    # Karras et al. 2022, rho = 7, between the table's smallest and largest sigma.
    lo, hi, rho = float(sigmas_desc[-1]), float(sigmas_desc[0]), 7.0
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    # The fractional training timestep of each sigma, interpolated in log sigma (diffusers').
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo_s, hi_s = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo_s - log_sigma) / (lo_s - hi_s), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _x0_coefs(prediction: str, sa: np.ndarray, sb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x0 = p x + q out in the variance-preserving parametrisation x = sa x0 + sb eps."""
    if prediction == "epsilon":
        return 1 / sa, -sb / sa
    if prediction == "v_prediction":
        return sa, -sb
    return np.zeros_like(sa), np.ones_like(sa)


def make_schedule(kind: str, cfg: SchedulerConfig, steps: int) -> Schedule:
    """The coefficients of `kind` (a `scheduler_config.SAMPLERS` name or a diffusers class
    name) for `steps` steps over `cfg`'s noise table."""
    kind = sampler_kind(kind)
    if kind == "ddim":
        raise ValueError("ddim steps through diffusion/ddim.py (ddim_step), not a Schedule")
    ddim._check_steps(cfg, steps)
    ac = ddim.alphas_cumprod(cfg)  # float32, as diffusers' torch table
    if cfg.rescale_betas_zero_snr and kind != "lcm":
        # Euler's and DPM-Solver's fix for zero terminal SNR (an infinite last sigma).
        ac = ac.copy()
        ac[-1] = np.float32(2.0**-24)
    table = np.sqrt((1 - ac) / ac)  # float32 k-diffusion sigmas, ascending in t
    n = steps
    zeros, ones = np.zeros(n), np.ones(n)
    clip = None
    if kind in ("euler", "euler_karras", "euler_ancestral"):
        model_t = _spaced(cfg, n)
        sig = np.interp(model_t, np.arange(len(table)), table)
        if kind == "euler_karras":
            sig = _karras(sig, n)
            model_t = _sigma_to_t(sig, np.log(table))
        sig = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
        s, s_next = sig[:-1], sig[1:]
        if cfg.prediction_type == "epsilon":
            p, q = ones, -s
        elif cfg.prediction_type == "v_prediction":
            p, q = 1 / (s**2 + 1), -s / np.sqrt(s**2 + 1)
        else:
            p, q = zeros, ones
        if kind != "euler_ancestral":
            target, d = s_next, zeros
        else:
            up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
            target, d = np.sqrt(s_next**2 - up**2), up
        a, b, c = target / s, 1 - target / s, zeros
        in_scale = 1 / np.sqrt(s**2 + 1)
        top = float(sig.max())
        init = top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    elif kind in ("dpmpp_2m", "dpmpp_2m_karras"):
        ts = _dpm_timesteps(cfg, n)
        if kind == "dpmpp_2m_karras":
            sig = _karras(table[::-1].copy(), n)
            ts = np.round(_sigma_to_t(sig, np.log(table)))
        else:
            sig = np.interp(ts, np.arange(len(table)), table)
        sig = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigma = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf after the last step (sigma 0)
        p, q = _x0_coefs(cfg.prediction_type, alpha[:-1], sigma[:-1])
        h = lam[1:] - lam[:-1]
        phi = -alpha[1:] * np.expm1(-h)  # alpha_t (1 - e^-h)
        a = sigma[1:] / sigma[:-1]
        # Second order (midpoint) from step 1 on; the first and the last (final sigma 0:
        # diffusers' lower_order_final) are first order.
        second = (np.arange(n) > 0) & (np.arange(n) < n - 1)
        h_prev = np.concatenate([[1.0], lam[1:-1] - lam[:-2]])
        r = np.where(second, h_prev / np.where(second, h, 1.0), 1.0)
        half = np.where(second, 0.5 * phi / r, 0.0)
        b, c, d = phi + half, -half, zeros
        model_t, in_scale, init = ts.astype(np.float64), ones, 1.0
    else:  # lcm
        k = cfg.num_train_timesteps // LCM_ORIGINAL_STEPS
        if k < 1:
            raise ValueError(f"lcm: num_train_timesteps={cfg.num_train_timesteps} is below "
                             f"original_inference_steps={LCM_ORIGINAL_STEPS}")
        origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
        if n > LCM_ORIGINAL_STEPS:
            raise ValueError(f"lcm: {n} steps; at most original_inference_steps="
                             f"{LCM_ORIGINAL_STEPS}")
        ts = origin[np.floor(np.linspace(0, len(origin), n, endpoint=False)).astype(np.int64)]
        at = ac[ts].astype(np.float64)
        edge = 1.0 if cfg.set_alpha_to_one else float(ac[0])
        a_prev = np.concatenate([ac[ts[1:]].astype(np.float64), [edge]])
        p, q = _x0_coefs(cfg.prediction_type, np.sqrt(at), np.sqrt(1 - at))
        scaled = ts * LCM_TIMESTEP_SCALING
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / np.sqrt(scaled**2 + 0.25)
        last = np.arange(n) == n - 1
        keep = np.where(last, 1.0, np.sqrt(a_prev))
        a, b, c = keep * c_skip, keep * c_out, zeros
        d = np.where(last, 0.0, np.sqrt(1 - a_prev))
        model_t, in_scale, init = ts.astype(np.float64), ones, 1.0
        clip = cfg.clip_sample_range if cfg.clip_sample else None
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float64), jnp.float32)  # noqa: E731
    return Schedule(f32(model_t), f32(in_scale), f32(p), f32(q), f32(a), f32(b), f32(c), f32(d),
                    kind, clip, float(init))


def scale_input(s: Schedule, i: Array | int, x: Array) -> Array:
    """The model's input at step i (`scheduler.scale_model_input`)."""
    return (x * s.in_scale[i].astype(x.dtype)).astype(x.dtype)


def step(s: Schedule, i: Array | int, model_output: Array, x: Array, x0_prev: Array,
         noise: Array | None = None) -> tuple[Array, Array]:
    """x_i -> x_{i+1} (`scheduler.step(...).prev_sample`) and this step's x0, which the next step
    takes as `x0_prev` (zeros at step 0). `noise` (standard normal, like `x`) is required for
    the kinds in `NOISY`. Computed in float32, returned in `x`'s dtype."""
    if s.kind in NOISY and noise is None:
        raise ValueError(f"{s.kind}: a step needs `noise`")
    xf, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
    x0 = s.p[i] * xf + s.q[i] * out
    if s.clip is not None:
        x0 = jnp.clip(x0, -s.clip, s.clip)
    prev = s.a[i] * xf + s.b[i] * x0 + s.c[i] * x0_prev.astype(jnp.float32)
    if noise is not None:
        prev = prev + s.d[i] * noise.astype(jnp.float32)
    return prev.astype(x.dtype), x0.astype(x.dtype)
