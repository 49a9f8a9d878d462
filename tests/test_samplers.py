"""Euler, Euler ancestral, DPM++ 2M (Karras) and LCM against diffusers' schedulers, step for
step over whole schedules: the same model (a fixed random map of the sample plus a function of
t, so DPM++'s multistep term is exercised), the same starting noise scaled by
`init_noise_sigma`, the same per-step noise (torch's generator, drawn in diffusers' order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from freeanimate_jax.diffusion import samplers
from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig, sampler_kind

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
        "set_alpha_to_one": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}
CLASSES = {"euler": EulerDiscreteScheduler, "euler_karras": EulerDiscreteScheduler,
           "euler_ancestral": EulerAncestralDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler,
           "dpmpp_2m_karras": DPMSolverMultistepScheduler, "lcm": LCMScheduler}
SHAPE = (2, 4, 6, 6)  # frames, channels, h, w (the model maps channels)
W = np.random.default_rng(0).normal(0, 0.6, (4, 4))


def model(x: np.ndarray, t: float) -> np.ndarray:
    """A sample- and step-dependent noise prediction, computed once in float64 for both sides."""
    x = np.asarray(x, np.float64)
    mixed = np.einsum("fchw,cd->fdhw", x, W)
    return (np.tanh(mixed / (1 + np.abs(x).max())) + 0.1 * np.cos(float(t) / 70.0)
            ).astype(np.float32)


def _torch_run(kind, config, steps, noise0):
    extra = {"use_karras_sigmas": True} if kind.endswith("_karras") else {}
    sch = CLASSES[kind].from_config({**config, **extra})
    sch.set_timesteps(steps)
    gen = torch.Generator().manual_seed(7)
    x = torch.from_numpy(noise0) * sch.init_noise_sigma
    xs = []
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        out = torch.from_numpy(model(inp.numpy(), float(t)))
        kw = {"generator": gen} if kind in samplers.NOISY else {}
        x = sch.step(out, t, x, **kw).prev_sample
        xs.append(x.numpy().copy())
    return sch, xs


def _our_run(kind, config, steps, noise0):
    sched = samplers.make_schedule(kind, SchedulerConfig.from_dict(config), steps)
    gen = torch.Generator().manual_seed(7)
    x = np.asarray(noise0) * np.float32(sched.init_noise_sigma)
    x0_prev = np.zeros_like(x)
    xs = []
    for i in range(steps):
        inp = np.asarray(samplers.scale_input(sched, i, x))
        out = model(inp, float(sched.model_t[i]))
        noise = None
        if kind == "euler_ancestral" or (kind == "lcm" and i < steps - 1):
            noise = torch.randn(SHAPE, generator=gen, dtype=torch.float32).numpy()
        elif kind == "lcm":
            noise = np.zeros(SHAPE, np.float32)
        x, x0_prev = (np.asarray(v) for v in samplers.step(sched, i, out, x, x0_prev, noise))
        xs.append(x)
    return sched, xs


CASES = [(k, {}, 25) for k in CLASSES] + [
    ("euler", {"timestep_spacing": "linspace"}, 20),
    ("euler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 12),
    ("euler_ancestral", {"timestep_spacing": "trailing"}, 10),
    ("dpmpp_2m", {"timestep_spacing": "linspace"}, 8),
    ("dpmpp_2m", {"prediction_type": "v_prediction"}, 20),
    ("dpmpp_2m_karras", {}, 6),
    ("lcm", {}, 4),
    ("lcm", {"clip_sample": True, "clip_sample_range": 1.5}, 8),
    # Zero terminal SNR: an infinite last sigma, which diffusers replaces (alphas_cumprod 2^-24).
    ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
    ("euler_ancestral", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 8),
    ("dpmpp_2m_karras", {"rescale_betas_zero_snr": True}, 8),
]


@pytest.mark.parametrize(("kind", "change", "steps"), CASES,
                         ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in c.items()) or 'sd15'}-{n}"
                              for k, c, n in CASES])
def test_sampler_equals_diffusers_step_by_step(kind, change, steps):
    config = {**SD15, **change}
    noise0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    ref_sch, ref = _torch_run(kind, config, steps, noise0)
    ours_sch, ours = _our_run(kind, config, steps, noise0)
    np.testing.assert_allclose(np.asarray(ours_sch.model_t),
                               ref_sch.timesteps.numpy().astype(np.float32), rtol=0, atol=1e-3)
    assert ours_sch.init_noise_sigma == pytest.approx(float(ref_sch.init_noise_sigma), rel=1e-6)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        bound = 1e-5 * max(1.0, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) <= bound, (i, float(np.abs(a - b).max()), bound)
    # The schedule moved the sample: a step that did nothing would also "match" a no-op.
    assert float(np.abs(ref[-1] - noise0).max()) > 0.1


def test_scheduler_names():
    assert sampler_kind("EulerAncestralDiscreteScheduler") == "euler_ancestral"
    assert sampler_kind("dpmpp_2m_karras") == "dpmpp_2m_karras"
    with pytest.raises(ValueError, match="unknown scheduler 'heun'; expected one of ddim, euler"):
        sampler_kind("heun")
    with pytest.raises(ValueError, match="needs `noise`"):
        s = samplers.make_schedule("lcm", SchedulerConfig.from_dict(SD15), 4)
        samplers.step(s, 0, np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32),
                      np.zeros(SHAPE, np.float32))


def test_scheduler_objects_name_their_sampler_and_refuse_what_they_lack():
    from freeanimate_jax.pipelines import schedulers as s

    base = s.DDIMScheduler.from_config(SD15)
    assert s.EulerDiscreteScheduler.from_config(base.config).kind == "euler"
    assert s.EulerDiscreteScheduler.from_config(base.config, use_karras_sigmas=True).kind \
        == "euler_karras"
    assert s.from_kind("dpmpp_2m_karras", base.config).config["use_karras_sigmas"] is True
    for cls, key, value in ((s.DPMSolverMultistepScheduler, "final_sigmas_type", "sigma_min"),
                            (s.DPMSolverMultistepScheduler, "solver_order", 3),
                            (s.EulerDiscreteScheduler, "use_exponential_sigmas", True),
                            (s.LCMScheduler, "original_inference_steps", 4)):
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            cls.from_config(base.config, **{key: value})
    with pytest.raises(ValueError, match="num_train_timesteps=40 is below"):
        samplers.make_schedule("lcm", SchedulerConfig(num_train_timesteps=40), 4)
