"""DDIM sampling/inversion parity with diffusers' DDIMScheduler and DDIMInverseScheduler."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from freeanimate_jax.diffusion.ddim import (
    SchedulerConfig,
    add_noise,
    alphas_cumprod,
    ddim_inverse_step,
    ddim_step,
    inverse_timesteps,
    make_tables,
    timesteps,
    velocity,
)
from tests.helpers import assert_parity

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "timestep_spacing": "leading"}

CONFIGS = {
    "ddim_defaults": {},
    "sd15": SD15,
    "linear_v_trailing": {"prediction_type": "v_prediction", "clip_sample": False,
                          "timestep_spacing": "trailing"},
    "scaled_sample_linspace": {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                               "beta_end": 0.012, "prediction_type": "sample",
                               "set_alpha_to_one": False, "timestep_spacing": "linspace"},
    "linear_sample_clip2": {"prediction_type": "sample", "clip_sample_range": 2.0,
                            "set_alpha_to_one": False, "steps_offset": 1},
    "linear_eps_clip_offset": {"steps_offset": 1, "set_alpha_to_one": False},
    "zero_snr_v": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                   "prediction_type": "v_prediction", "clip_sample": False,
                   "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
}
NHWC = (2, 8, 8, 4)


def _jax_model(x, t):
    return 0.1 * x + jnp.sin(jnp.asarray(t, jnp.float32))


def _torch_model(x, t):
    return 0.1 * x + math.sin(int(t))


def _to_torch(x):  # channels-last -> channels-first
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _from_torch(x):
    return np.moveaxis(x.numpy(), 1, -1)


def _run_pair(d, n, *, eta=0.0, inverse=False, shape=NHWC, seed=0):
    """Runs our loop and diffusers' side by side, each on its own trajectory; returns our final
    sample and the largest per-step error."""
    cfg = SchedulerConfig.from_dict(d)
    tables = make_tables(cfg, n)
    ref = (DDIMInverseScheduler if inverse else DDIMScheduler).from_config(d)
    ref.set_timesteps(n)
    ts = inverse_timesteps(cfg, n) if inverse else timesteps(cfg, n)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal((n, *shape)).astype(np.float32)
    ours, theirs = jnp.asarray(x), _to_torch(x)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        mo_ours, mo_theirs = _jax_model(ours, int(t)), _torch_model(theirs, t)
        if inverse:
            ours = ddim_inverse_step(tables, mo_ours, int(t), ours)
            theirs = ref.step(mo_theirs, t, theirs).prev_sample
        else:
            ours = ddim_step(tables, mo_ours, int(t), ours, eta=eta,
                             noise=jnp.asarray(noise[i]) if eta else None)
            theirs = ref.step(mo_theirs, t, theirs, eta=eta,
                              variance_noise=_to_torch(noise[i]) if eta else None).prev_sample
        worst = max(worst, assert_parity(ours, _from_torch(theirs), f"step {i} (t={int(t)})"))
    return ours, worst


# --- config -----------------------------------------------------------------------------------

def test_from_dict_ignores_unrelated_keys():
    d = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "skip_prk_steps": True,
         "trained_betas": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
         "sample_max_value": 1.0, "variance_type": "fixed_small", **SD15}
    cfg = SchedulerConfig.from_dict(d)
    assert cfg == SchedulerConfig(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    assert SchedulerConfig.from_dict({}).clip_sample is True  # DDIM's default, not PNDM's


def test_from_pretrained(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    assert SchedulerConfig.from_pretrained(tmp_path, subfolder="scheduler") == \
        SchedulerConfig.from_dict(SD15)
    assert SchedulerConfig.from_pretrained(tmp_path / "scheduler").steps_offset == 1


@pytest.mark.parametrize("key,value", [
    ("thresholding", True), ("beta_schedule", "squaredcos_cap_v2"),
    ("timestep_spacing", "karras"), ("prediction_type", "flow_prediction"),
    ("trained_betas", [0.1, 0.2]), ("set_alpha_to_zero", False), ("clip_sample", "false"),
    ("num_train_timesteps", 1.5),
])
def test_unsupported_settings_raise(key, value):
    with pytest.raises(ValueError, match=key):
        SchedulerConfig.from_dict({**SD15, key: value})


def test_bad_step_counts_raise():
    cfg = SchedulerConfig()
    for n in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_tables(cfg, n)
    with pytest.raises(ValueError, match="steps_offset"):  # timesteps 1000..1 would clamp
        make_tables(SchedulerConfig(steps_offset=1), 1000)
    with pytest.raises(ValueError, match="timestep_spacing"):
        inverse_timesteps(SchedulerConfig(timestep_spacing="linspace"), 10)
    tables = make_tables(cfg, 10)
    x = jnp.zeros(NHWC)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(tables, x, 900, x, eta=0.5)


# --- tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim_defaults", "sd15"])
def test_alphas_cumprod_bit_exact(name):
    ref = DDIMScheduler.from_config(CONFIGS[name]).alphas_cumprod.numpy()
    ours = alphas_cumprod(SchedulerConfig.from_dict(CONFIGS[name]))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_alphas_cumprod_zero_snr():
    # torch's CPU float32 sqrt is not correctly rounded (ours is), so only ~1 ulp apart here.
    d = CONFIGS["zero_snr_v"]
    ref = DDIMScheduler.from_config(d).alphas_cumprod.numpy()
    ours = alphas_cumprod(SchedulerConfig.from_dict(d))
    assert ours[-1] == ref[-1] == 0.0
    assert_parity(ours, ref, "alphas_cumprod", tol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
    d = {"timestep_spacing": spacing, "steps_offset": offset}
    cfg = SchedulerConfig.from_dict(d)
    for n in (1, 7, 10, 25, 50, 333):
        ref = DDIMScheduler(**d)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(timesteps(cfg, n), ref.timesteps.numpy())
        inv = DDIMInverseScheduler(**d)
        if spacing == "linspace":  # diffusers' inverse scheduler rejects it too
            with pytest.raises(ValueError):
                inv.set_timesteps(n)
            continue
        inv.set_timesteps(n)
        np.testing.assert_array_equal(inverse_timesteps(cfg, n), inv.timesteps.numpy())


# --- step parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddim_loop_matches_diffusers(name, eta):
    _run_pair(CONFIGS[name], 10, eta=eta)


@pytest.mark.parametrize("name", [k for k, d in CONFIGS.items()
                                  if d.get("timestep_spacing") != "linspace"])
def test_inverse_loop_matches_diffusers(name):
    _run_pair(CONFIGS[name], 10, inverse=True)


def test_sd15_config():
    cfg = SchedulerConfig.from_dict(SD15)
    tables = make_tables(cfg, 50)
    ac = alphas_cumprod(cfg)
    assert tables.step_size == 20
    assert timesteps(cfg, 50)[0] == 981 and timesteps(cfg, 50)[-1] == 1
    assert inverse_timesteps(cfg, 50)[0] == 1 and inverse_timesteps(cfg, 50)[-1] == 981
    assert float(tables.final_alpha_cumprod) == float(tables.initial_alpha_cumprod) == ac[0]
    video = (1, 3, 8, 8, 4)  # (B, F, H, W, C)
    _run_pair(SD15, 50, shape=video)
    _run_pair(SD15, 50, shape=video, inverse=True)
    _run_pair(SD15, 25, shape=video, eta=1.0)


# --- jit / scan -------------------------------------------------------------------------------

def _python_loop(tables, ts, x, eta, noise, inverse):
    for i, t in enumerate(ts):
        mo = _jax_model(x, int(t))
        x = (ddim_inverse_step(tables, mo, int(t), x) if inverse
             else ddim_step(tables, mo, int(t), x, eta=eta, noise=noise[i]))
    return x


@jax.jit
def _scan_loop(tables, ts, x, eta, noise):
    def body(x, t_and_noise):
        t, z = t_and_noise
        return ddim_step(tables, _jax_model(x, t), t, x, eta=eta, noise=z), None
    return jax.lax.scan(body, x, (ts, noise))[0]


@jax.jit
def _scan_inverse(tables, ts, x):
    def body(x, t):
        return ddim_inverse_step(tables, _jax_model(x, t), t, x), None
    return jax.lax.scan(body, x, ts)[0]


@pytest.mark.parametrize("name,eta", [("sd15", 0.0), ("zero_snr_v", 0.7),
                                      ("ddim_defaults", 0.3)])
def test_scan_matches_python_loop(name, eta):
    cfg, n = SchedulerConfig.from_dict(CONFIGS[name]), 12
    tables = make_tables(cfg, n)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(NHWC), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((n, *NHWC)), jnp.float32)
    ts = timesteps(cfg, n)
    want = _python_loop(tables, ts, x, eta, noise, inverse=False)
    got = _scan_loop(tables, jnp.asarray(ts, jnp.int32), x, eta, noise)
    assert_parity(got, want, "scan vs loop", tol=1e-6)
    # And against diffusers, end to end.
    ref_final, _ = _run_pair(CONFIGS[name], n, eta=eta, seed=1)
    if eta == 0.0:
        assert_parity(got, ref_final, "scan vs diffusers")

    its = inverse_timesteps(cfg, n)
    want = _python_loop(tables, its, x, 0.0, None, inverse=True)
    got = _scan_inverse(tables, jnp.asarray(its, jnp.int32), x)
    assert_parity(got, want, "inverse scan vs loop", tol=1e-6)


def test_jit_traced_timestep():
    tables = make_tables(SchedulerConfig.from_dict(SD15), 50)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(NHWC), jnp.float32)
    traces = []

    @jax.jit
    def step(tables, mo, t, x):
        traces.append(t)
        return ddim_step(tables, mo, t, x)

    for t in (981, 21, 1):  # t=1 takes the final-alpha branch under tracing
        assert_parity(step(tables, _jax_model(x, t), jnp.int32(t), x),
                      ddim_step(tables, _jax_model(x, t), t, x), f"t={t}", tol=1e-6)
    assert len(traces) == 1  # one trace serves every timestep


def test_bf16_keeps_dtype():
    tables = make_tables(SchedulerConfig.from_dict(SD15), 50)
    x = jnp.ones(NHWC, jnp.bfloat16)
    assert ddim_step(tables, x, 981, x).dtype == jnp.bfloat16
    assert ddim_inverse_step(tables, x, 1, x).dtype == jnp.bfloat16


# --- training helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd15", "zero_snr_v"])
def test_add_noise_and_velocity_match_diffusers(name):
    d = CONFIGS[name]
    ref = DDIMScheduler.from_config(d)
    tables = make_tables(SchedulerConfig.from_dict(d), 50)
    rng = np.random.default_rng(3)
    shape = (3, 2, 4, 4, 4)
    x0, noise = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 999])
    args_t = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    for alphas in (tables, tables.alphas_cumprod, alphas_cumprod(SchedulerConfig.from_dict(d))):
        assert_parity(add_noise(alphas, x0, noise, t), ref.add_noise(*args_t).numpy(),
                      "add_noise")
        assert_parity(velocity(alphas, x0, noise, t), ref.get_velocity(*args_t).numpy(),
                      "velocity")
    scalar_t = torch.tensor(700)
    assert_parity(add_noise(tables, x0, noise, 700),
                  ref.add_noise(*args_t[:2], scalar_t).numpy(), "add_noise scalar t")
