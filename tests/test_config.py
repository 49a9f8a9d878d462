"""The job configs (animate, generate): layering, strictness (one-line errors naming the key),
runbooks."""

import dataclasses
from pathlib import Path

import pytest

from freeanimate_jax.config import (
    DEMO_CONFIG,
    DEMO_GENERATE_CONFIG,
    DEMO_TRAIN_CONFIG,
    MOTION_ADAPTER,
    TOY_MODEL,
    AnimateConfig,
    AnimateJob,
    ConfigError,
    GenerateConfig,
    GenerateJob,
    TrainJob,
    default_compilation_cache,
    load_job,
    parse_weighted,
)
from freeanimate_jax.diffusion.ddim import SchedulerConfig
from freeanimate_jax.pipelines.animate import AnimateSettings
from freeanimate_jax.pipelines.generate import GenerateSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text, f"error spans lines: {text!r}"
    return text


def test_defaults_match_animate_settings():
    job = load_job(None, [])
    assert job.settings() == AnimateSettings()
    assert job.size_hw == (512, 512) and job.dtype == "auto" and job.frames is None
    assert {f.name for f in dataclasses.fields(AnimateConfig)} == {
        f.name for f in dataclasses.fields(AnimateSettings)}


def test_job_is_frozen():
    job = load_job(None, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.fps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.animate.steps = 3  # type: ignore[misc]


def test_layers_later_wins(tmp_path):
    path = write(tmp_path, "size: 256\nprompt: from file\nanimate:\n  steps: 10\n  seed: 4\n")
    job = load_job(path, ["animate.steps=3"], base={"fps": 12, "animate": {"seed": 1}},
                   flags={"prompt": "from flag"})
    assert job.size_hw == (256, 256)
    assert job.fps == 12.0  # base, untouched by the file
    assert job.animate.seed == 4  # file over base
    assert job.prompt == "from flag"  # flags over the file
    assert job.animate.steps == 3  # overrides over everything
    job = load_job(path, ["prompt=override"], flags={"prompt": "from flag"})
    assert job.prompt == "override"


def test_override_values_are_typed():
    job = load_job(None, ["size=[512,384]", "animate.iba_layers=[a.attn1,b.attn1]",
                          "animate.clip_skip=2", "animate.guidance_scale=3", "frames=8"])
    assert job.size_hw == (512, 384)
    settings = job.settings()
    assert settings.iba_layers == ("a.attn1", "b.attn1")  # lists become AnimateSettings' tuples
    assert settings.clip_skip == 2 and settings.guidance_scale == 3.0 and job.frames == 8


def test_string_overrides_are_verbatim():
    # YAML would read `yes` as true and `123` as a number; a string key keeps the text.
    job = load_job(None, ["prompt=yes", "animate.negative_prompt=123", "model=a=b"])
    assert job.prompt == "yes" and job.animate.negative_prompt == "123" and job.model == "a=b"


@pytest.mark.parametrize("override, key, listed", [
    ("colour=red", "'colour'", "model, controlnet, prompt, size"),
    ("animate.stepz=3", "'animate.stepz'", "steps, preview_steps, guidance_scale"),
])
def test_unknown_override_key(override, key, listed):
    text = error_of(None, [override])
    assert f"unknown config key {key}" in text and listed in text


def test_unknown_key_suggests_the_animate_section():
    text = error_of(None, ["steps=3"])
    assert "unknown config key 'steps'" in text and "did you mean 'animate.steps'" in text


def test_unknown_key_in_file(tmp_path):
    text = error_of(write(tmp_path, "animate:\n  steps: 4\n  guidance: 3\n"), [])
    assert "unknown config key 'animate.guidance'" in text and "guidance_scale" in text
    text = error_of(write(tmp_path, "modle: x\n"), [])
    assert "unknown config key 'modle'" in text and "expected one of the top-level keys" in text


@pytest.mark.parametrize("override, phrase", [
    ("animate.steps=abc", "config key 'animate.steps' = 'abc' has the wrong type; expected an "
                          "integer"),
    ("animate.steps=2.5", "expected an integer"),
    ("fps=fast", "config key 'fps' = 'fast' has the wrong type; expected a number"),
    ("animate.iba_layers=up", "expected a list of strings"),
    ("animate.clip_skip=x", "expected an integer or null"),
    ("animate=3", "sets the whole section 'animate'"),
    ("model.sub=1", "'model' is a value, not a section"),
    ("animate.steps", "is not key=value"),
    ("size=[64]", "expected an integer or [height, width]"),
    ("size=big", "expected an integer or [height, width]"),
    ("dtype=float16", "expected one of auto, float32, bfloat16"),
    ("frames=0", "expected a pose count of at least 1"),
    ("fps=0", "fps=0.0; expected a positive number"),
    ("sheet_rows=0", "sheet_rows=0; expected at least 1"),
    ("animate.cache_mode=disk", "animate: cache_mode='disk'; expected one of"),
    ("animate.iba_until=2", "animate: iba_until=2.0 must be a fraction"),
    ("animate.steps=0", "animate: steps and preview_steps must be at least 1"),
    ("model=builtin:tiny", "expected both or neither to be 'builtin:tiny'"),
])
def test_bad_values(override, phrase):
    assert phrase in error_of(None, [override])


def test_wrong_type_in_file(tmp_path):
    text = error_of(write(tmp_path, "animate:\n  ra_sa_layers: up_blocks\n"), [])
    assert "'animate.ra_sa_layers' = 'up_blocks' has the wrong type" in text
    text = error_of(write(tmp_path, "animate: 3\n"), [])
    assert "section 'animate' is an int; expected a mapping" in text


@pytest.mark.parametrize("size", ["100", "[512,500]", "4"])
def test_size_must_be_multiple_of_8(size):
    assert "not a multiple of 8" in error_of(None, [f"size={size}"])


def test_bad_files(tmp_path):
    assert "no such config file" in error_of(str(tmp_path / "missing.yaml"), [])
    assert "malformed YAML" in error_of(write(tmp_path, "animate: [unclosed\n"), [])
    assert "top level is a list" in error_of(write(tmp_path, "- 1\n- 2\n"), [])
    assert load_job(write(tmp_path, ""), []) == load_job(None, [])  # empty file = defaults


def test_compilation_cache_default(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_compilation_cache() == str(tmp_path / "freeanimate_jax" / "xla")
    assert load_job(None, []).compilation_cache == str(tmp_path / "freeanimate_jax" / "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert load_job(None, []).compilation_cache == str(tmp_path / "jax")
    assert load_job(None, ["compilation_cache="]).compilation_cache == ""


def test_to_dict_is_plain():
    d = load_job(None, []).to_dict()
    assert d["animate"]["iba_layers"] == list(AnimateSettings().iba_layers)
    assert d["model"] == AnimateJob().model


# -- the runbooks -------------------------------------------------------------------------------
RUNBOOKS = {"demo": AnimateJob, "sd15_animate": AnimateJob, "sd15_animate_long": AnimateJob,
            "demo_generate": GenerateJob, "animatediff_v2": GenerateJob,
            "animatediff_v3": GenerateJob, "train_motion_v3": TrainJob,
            "train_motion_tiny": TrainJob, "toy_vae": TrainJob, "toy_unet": TrainJob,
            "toy_controlnet": TrainJob, "toy_motion": TrainJob}


def test_every_runbook_is_tested():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(RUNBOOKS)


@pytest.mark.parametrize("name", list(RUNBOOKS))
def test_runbooks_parse_and_document_themselves(name):
    path, schema = CONFIGS / f"{name}.yaml", RUNBOOKS[name]
    text = path.read_text()
    assert text.startswith("# "), "a runbook starts with its header comment"
    verb = "train run" if schema is TrainJob else schema.SECTION
    command = f"freeanimate {verb} --config configs/{name}.yaml"
    assert command in text and "Expect" in text  # the command, what to expect
    job = load_job(str(path), [], schema=schema)
    job.settings()


def test_demo_yaml_matches_the_builtin_demo_config():
    # `--demo` uses DEMO_CONFIG (an installed package has no configs/); the runbook must agree.
    assert load_job(str(CONFIGS / "demo.yaml"), []) == load_job(None, [], base=DEMO_CONFIG)
    job = load_job(None, [], base=DEMO_CONFIG)
    assert job.model == job.controlnet == TOY_MODEL and job.size_hw == (64, 64)
    assert job.animate.steps == job.animate.preview_steps == 20 and job.dtype == "float32"


def test_train_tiny_yaml_matches_the_builtin_demo_config():
    assert load_job(str(CONFIGS / "train_motion_tiny.yaml"), [], schema=TrainJob) == load_job(
        None, [], base=DEMO_TRAIN_CONFIG, schema=TrainJob)


def test_train_recipe_runbook_is_the_original_recipe():
    data, noise, optim, loop, val = load_job(str(CONFIGS / "train_motion_v3.yaml"), [],
                                             schema=TrainJob).sections()
    assert (data.frames, data.stride, data.caption_dropout, data.hflip) == (16, 4, 0.1, True)
    assert (noise.beta_schedule, noise.beta_start, noise.beta_end) == ("linear", 0.00085, 0.012)
    assert (optim.lr, optim.b1, optim.b2, optim.eps, optim.weight_decay, optim.grad_clip) == (
        1e-4, 0.9, 0.999, 1e-8, 1e-2, 1.0)
    assert (loop.trainable, loop.batch_per_chip, loop.norm_per_frame) == (
        "motion_modules", 4, True)


def test_sd15_runbooks():
    job = load_job(str(CONFIGS / "sd15_animate.yaml"), [])
    assert job.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert job.controlnet == "lllyasviel/control_v11p_sd15_openpose"
    assert job.size_hw == (512, 512) and job.animate.steps == 25
    assert job.animate.cache_mode == "hidden" and job.frames is None
    long = load_job(str(CONFIGS / "sd15_animate_long.yaml"), [])
    assert long.frames == 64 and long.animate.cache_mode == "recompute"
    # Otherwise the same job: the long runbook is a few overrides of the short one.
    assert dataclasses.replace(long, frames=None, animate=job.animate) == job
    assert dataclasses.replace(long.animate, cache_mode="hidden") == job.animate


# -- the generate job -----------------------------------------------------------------------------
def test_generate_defaults_match_generate_settings():
    job = load_job(None, [], schema=GenerateJob)
    assert isinstance(job, GenerateJob) and job.settings() == GenerateSettings()
    assert job.motion_module == MOTION_ADAPTER and job.controlnet == ""
    assert job.lora == job.motion_lora == [] and job.scheduler_overrides() == {}
    assert {f.name for f in dataclasses.fields(GenerateConfig)} == {
        f.name for f in dataclasses.fields(GenerateSettings)}
    # The shared keys: animate has them too, with no motion module by default.
    animate = load_job(None, [])
    assert animate.motion_module == "" and animate.lora == [] and animate.domain_adapter == ""


def test_generate_overrides_and_hints():
    job = load_job(None, ["generate.frames=24", "generate.context_length=16", "lora=a.st:0.5",
                          "motion_lora=[m1.ckpt, m2.ckpt:0.3]", "scheduler.beta_schedule=linear",
                          "scheduler.steps_offset=1"], schema=GenerateJob)
    s = job.settings()
    assert (s.frames, s.context_length) == (24, 16)
    assert job.lora == ["a.st:0.5"] and job.motion_lora == ["m1.ckpt", "m2.ckpt:0.3"]
    assert job.scheduler_overrides() == {"beta_schedule": "linear", "steps_offset": 1}
    assert load_job(None, ["lora="], schema=GenerateJob).lora == []
    with pytest.raises(ConfigError, match="did you mean 'generate.steps'"):
        load_job(None, ["steps=3"], schema=GenerateJob)
    with pytest.raises(ConfigError, match="unknown config key 'animate'"):
        load_job(None, ["animate.steps=3"], schema=GenerateJob)


@pytest.mark.parametrize("override, phrase", [
    ("scheduler.beta_schedule=cosine", "scheduler: unsupported beta_schedule='cosine'"),
    ("scheduler.steps_offset=x", "'scheduler.steps_offset' = 'x' has the wrong type"),
    ("generate.frames=0", "generate: frames and steps must be at least 1"),
    ("generate.vae_chunk=0", "generate.vae_chunk=0; expected at least 1"),
    ("motion_module=builtin:tiny", "the tiny motion module fits only it"),
    ("motion_module=", "motion_module='': generate needs one; expected an AnimateDiff motion"),
    ("controlnet=builtin:tiny", "expected both or neither to be 'builtin:tiny'"),
])
def test_generate_bad_values(override, phrase):
    assert phrase in error_of(None, [override], schema=GenerateJob)


def test_motion_lora_needs_a_motion_module():
    assert "motion_lora without a motion_module" in error_of(None, ["motion_lora=m.ckpt"])


@pytest.mark.parametrize("spec, parsed", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.8", ("a.safetensors", 0.8)),
    ("C:\\loras\\a.ckpt", ("C:\\loras\\a.ckpt", 1.0)), ("dir/a:b.ckpt:2", ("dir/a:b.ckpt", 2.0)),
])
def test_parse_weighted(spec, parsed):
    assert parse_weighted(spec) == parsed


def test_demo_generate_yaml_matches_the_builtin_config():
    job = load_job(None, [], base=DEMO_GENERATE_CONFIG, schema=GenerateJob)
    assert load_job(str(CONFIGS / "demo_generate.yaml"), [], schema=GenerateJob) == job
    assert job.model == job.motion_module == TOY_MODEL and job.size_hw == (64, 64)
    assert job.settings().frames == 16 and job.dtype == "float32"


def test_animatediff_runbooks_use_the_originals_sampling():
    v2 = load_job(str(CONFIGS / "animatediff_v2.yaml"), [], schema=GenerateJob)
    v3 = load_job(str(CONFIGS / "animatediff_v3.yaml"), [], schema=GenerateJob)
    for job in (v2, v3):
        s = job.settings()
        assert (s.frames, s.steps, s.guidance_scale, job.size_hw) == (16, 25, 7.5, (512, 512))
        sched = SchedulerConfig(**job.scheduler_overrides())
        assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012,
                                                                           "linear")
        assert sched.steps_offset == 1 and not sched.clip_sample
    assert v2.motion_module == "guoyww/animatediff-motion-adapter-v1-5-2"
    assert v3.motion_module == "guoyww/animatediff-motion-adapter-v1-5-3"
    assert v2.domain_adapter == "" and parse_weighted(v3.domain_adapter) == (
        "hf://guoyww/animatediff/v3_sd15_adapter.ckpt", 1.0)
    # Otherwise the same job.
    assert dataclasses.replace(v3, motion_module=v2.motion_module, domain_adapter="") == v2


def test_settings_and_config_import_no_jax():
    # The command line checks its arguments with these before any device work.
    import subprocess
    import sys

    code = ("import sys, freeanimate_jax.config, freeanimate_jax.pipelines.settings, "
            "freeanimate_jax.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'flax', 'jaxlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_the_toy_family_parts_go_only_with_the_toy_model_and_it_with_them():
    text = error_of(None, ["controlnet=builtin:toy"])
    assert "controlnet='builtin:toy'" in text and "expected both or neither" in text
    text = error_of(None, ["motion_module=builtin:toy"], schema=GenerateJob)
    assert "motion_module='builtin:toy'" in text
    text = error_of(None, ["model=builtin:toy"])  # with SD's openpose ControlNet
    assert "model='builtin:toy'" in text and "expected both or neither" in text
    job = load_job(None, ["model=builtin:toy", "controlnet=builtin:toy"])
    assert job.model == job.controlnet == "builtin:toy"


def test_a_vae_objective_needs_an_image_run_on_pixels():
    text = error_of(None, ["train.objective=vae"], schema=TrainJob)  # motion v3 by default
    assert "train.objective" in text and "train.motion=none" in text
    text = error_of(None, ["train.objective=vae", "train.motion=none", "data.source=latents"],
                    schema=TrainJob)
    assert "not data.source=latents" in text
    assert "expected diffusion | vae" in error_of(None, ["train.objective=gan"], schema=TrainJob)
    text = error_of(None, ["train.objective=vae", "train.motion=none", "val.every=10"],
                    schema=TrainJob)
    assert "val.every=10" in text and "expected 0" in text
