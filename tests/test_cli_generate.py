"""`freeanimate generate` (and `animate --motion-module`): the demo end to end in a fresh
process, the wiring in-process with stand-ins, and every bad input failing with one stderr line,
exit status 2 and nothing written."""

import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from freeanimate_jax import cli
from freeanimate_jax.cli import run as cli_run
from freeanimate_jax.demo import tiny_models, tiny_motion_adapter
from freeanimate_jax.io import read_video
from freeanimate_jax.io.sheet import SEP
from freeanimate_jax.models.motion import UNetMotionModel
from freeanimate_jax.pipelines import animate as animate_pipeline
from freeanimate_jax.pipelines import generate as generate_pipeline
from freeanimate_jax.pipelines.generate import GenerateResult
from freeanimate_jax.weights import assemble
from freeanimate_jax.weights.export import export_motion_adapter, export_original
from tests.helpers import FakeAnimate, listing

# The demo subprocess and the MP4 reader (ffmpeg) fork+exec new programs, which share no locks
# with this process: JAX's warning about forking a multithreaded process does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# -- the demo, end to end, in a new process -----------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python -m freeanimate_jax generate --demo` once, on one CPU device as a plain run."""
    root = tmp_path_factory.mktemp("generate")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(root / "xdg")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run sees (conftest asks for 8)
    out = root / "out" / "demo.mp4"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "freeanimate_jax", "generate", "--demo", "--out", str(out),
         f"compilation_cache={root / 'xla'}"],
        env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout}\n{proc.stderr}"
    return types.SimpleNamespace(proc=proc, out=out, wall=time.perf_counter() - start)


@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    assert "Traceback" not in demo_run.proc.stderr
    frames, fps = read_video(demo_run.out)
    assert frames.shape == (16, 64, 64, 3) and fps == pytest.approx(8.0)
    assert sorted(p.name for p in demo_run.out.parent.iterdir()) == [
        "demo.json", "demo.mp4", "demo.sheet.png"]  # and no temp files
    with Image.open(demo_run.out.with_name("demo.sheet.png")) as sheet:
        assert sheet.width == 64  # one column: the result (no poses)
    record = json.loads(demo_run.out.with_name("demo.json").read_text())
    assert record["config"]["model"] == record["config"]["motion_module"] == "builtin:toy"
    assert record["config"]["generate"]["frames"] == 16
    assert record["outputs"] == {"video": "demo.mp4", "sheet": "demo.sheet.png",
                                 "json": "demo.json", "frames": 16, "height": 64, "width": 64,
                                 "fps": 8.0}
    assert record["inputs"]["demo"] is True and record["runtime"]["mesh"] is None
    assert {"load_models", "denoise", "decode", "total"} <= set(record["timings"])
    assert "jax" in record["versions"] and "wrote" in demo_run.proc.stdout


# -- in-process runs with stand-ins ---------------------------------------------------------------
class FakeGenerate:
    """Generate's interface with instant, checkable output."""

    made: list["FakeGenerate"] = []

    def __init__(self, models, settings, *, mesh=None, progress=None):
        self.models, self.settings, self.mesh, self.progress = models, settings, mesh, progress
        FakeGenerate.made.append(self)

    def __call__(self, prompt, size_hw, poses=None):
        self.seen = (prompt, size_hw, poses)
        frames = np.random.default_rng(0).random((self.settings.frames, *size_hw, 3), np.float32)
        return GenerateResult(frames, {"denoise": 0.02, "total": 0.03})


@pytest.fixture
def fake(monkeypatch):
    FakeGenerate.made = []
    monkeypatch.setattr(generate_pipeline, "Generate", FakeGenerate)
    monkeypatch.setattr(assemble, "load_models",
                        lambda job, dtype: types.SimpleNamespace(job=job, unet=None))
    return FakeGenerate


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path


def test_generate_wiring(fake, out, capsys):
    rc, stdout, err = run(capsys, "generate", "--demo", "--prompt", "a cat", "--negative-prompt",
                          "blurry", "--out", out / "out" / "v.npz", "generate.seed=4",
                          "--lora", "a.safetensors:0.5", "--lora", "b.safetensors",
                          "compilation_cache=")
    assert (rc, err) == (0, "")
    (pipe,) = fake.made
    assert pipe.seen == ("a cat", (64, 64), None)
    assert pipe.settings.negative_prompt == "blurry" and pipe.settings.seed == 4
    assert pipe.settings.frames == 16 and pipe.mesh is not None  # 8 CPU devices (conftest)
    assert pipe.models.job.lora == ["a.safetensors:0.5", "b.safetensors"]
    frames, _ = read_video(out / "out" / "v.npz")
    assert frames.shape == (16, 64, 64, 3)
    record = json.loads((out / "out" / "v.json").read_text())
    assert record["inputs"] == {"prompt": "a cat", "poses": None, "frames": 16, "demo": True}
    assert record["timings"]["denoise"] == 0.02 and "wrote" in stdout


def test_generate_with_controlnet_and_poses(fake, out, capsys):
    rc, _, err = run(capsys, "generate", "--demo", "--controlnet", "builtin:toy", "--quiet",
                     "--out", out / "out" / "v.gif", "generate.frames=8", "compilation_cache=")
    assert (rc, err) == (0, "")
    poses = fake.made[-1].seen[2]
    assert poses.shape == (8, 64, 64, 3) and poses.dtype == np.uint8  # the demo's poses
    with Image.open(out / "out" / "v.sheet.png") as sheet:
        assert sheet.width == 2 * 64 + SEP  # pose | result


# The demo's inputs with the random tiny family (the toy family's parts fit only it).
TINY_FAMILY = ("model=builtin:tiny", "controlnet=builtin:tiny")


def test_animate_with_a_motion_module(monkeypatch, out, capsys):
    # The real model assembly (tiny models, an exported adapter folder), a stand-in pipeline.
    FakeAnimate.made, FakeAnimate.nan = [], False
    monkeypatch.setattr(animate_pipeline, "FreeAnimate", FakeAnimate)
    folder = export_motion_adapter(tiny_motion_adapter(), out / "adapter")
    rc, _, err = run(capsys, "animate", "--demo", "--motion-module", folder, "--quiet",
                     "--out", out / "out" / "v.npz", "compilation_cache=", *TINY_FAMILY)
    assert (rc, err) == (0, "")
    (pipe,) = FakeAnimate.made
    assert isinstance(pipe.models.unet, UNetMotionModel) and pipe.models.unet.has_motion
    assert len(pipe.seen[1]) == 16
    record = json.loads((out / "out" / "v.json").read_text())
    assert record["config"]["motion_module"] == str(folder)


def test_single_file_model_with_a_motion_module_file(monkeypatch, out, capsys):
    # --model FILE goes through single_file (stood in here: it needs diffusers and SD configs);
    # the motion module is a released-layout file, loaded for real.
    from freeanimate_jax.weights import single_file

    seen = []

    def fake_single_file(path, *, dtype):
        seen.append(path)
        models = tiny_models(0, dtype=dtype)
        models.controlnet = None
        return models

    monkeypatch.setattr(single_file, "load_single_file", fake_single_file)
    FakeGenerate.made = []
    monkeypatch.setattr(generate_pipeline, "Generate", FakeGenerate)
    (out / "model.safetensors").touch()
    module = export_original(tiny_motion_adapter(), out / "mm.safetensors")
    rc, _, err = run(capsys, "generate", "--prompt", "p", "--model", out / "model.safetensors",
                     "--motion-module", module, "--quiet", "--out", out / "out" / "v.mp4",
                     "size=64", "generate.frames=8", "scheduler.beta_schedule=linear",
                     "compilation_cache=")
    assert (rc, err) == (0, "")
    assert seen == [str(out / "model.safetensors")]
    (pipe,) = FakeGenerate.made
    assert isinstance(pipe.models.unet, UNetMotionModel)
    assert pipe.models.scheduler.beta_schedule == "linear"  # the override, over the model's


# -- bad input: exit 2, one stderr line, nothing written ----------------------------------------
def _lora_file(keys: list[str]):
    """A LoRA shaped for SD 1.5's 320 channels: the tiny models have 32."""
    def make(root: Path) -> Path:
        state = {}
        for stem in keys:
            state[stem.format(part="down")] = np.zeros((4, 320), np.float32)
            state[stem.format(part="up")] = np.zeros((320, 4), np.float32)
        save_file(state, str(root / "lora.safetensors"))
        return root / "lora.safetensors"
    return make


SD_LORA = _lora_file(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
                      ".lora_{part}.weight"])
MOTION_LORA = _lora_file(["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks"
                          ".0.attention_blocks.0.processor.to_q_lora.{part}.weight"])
SPATIAL_LORA = _lora_file(["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
                           ".to_q_lora.{part}.weight"])


def _txt(root: Path) -> Path:
    (root / "mm.txt").write_text("not weights")
    return root / "mm.txt"


def _no_config(root: Path) -> Path:
    (root / "adapter").mkdir()
    return root / "adapter"


def _under_a_file(root: Path) -> Path:
    (root / "afile").write_text("x")
    return root / "afile" / "v.mp4"


DEMO = ("--demo", "generate.steps=1")
BAD_INPUTS = {
    # name: (argv after `generate`, made from the test folder; phrase in the error)
    "motion module .txt": (lambda r: ["--prompt", "p", "--motion-module", _txt(r)],
                           "motion_module: "),
    "motion module folder without config": (
        lambda r: ["--prompt", "p", "--motion-module", _no_config(r)], "no config.json"),
    "too many frames": (lambda r: [*DEMO, "generate.frames=40"],
                        "exceed the motion module's position table (32)"),
    "window over the table": (
        lambda r: [*DEMO, "generate.frames=48", "generate.context_length=40"],
        "generate.context_length: 40 frames exceed"),
    "frames over the devices": (lambda r: [*DEMO, "generate.frames=12"],
                                "12 frames do not divide over 8 devices"),
    "sd lora for another base": (lambda r: [*DEMO, "--lora", SD_LORA(r)],
                                 "LoRA does not fit these models"),
    "motion lora for another base": (lambda r: [*DEMO, "--motion-lora", MOTION_LORA(r)],
                                     "LoRA for the wrong base"),
    "domain adapter for another base": (lambda r: [*DEMO, "--domain-adapter", SPATIAL_LORA(r)],
                                        "lora.safetensors: LoRA for the wrong base"),
    "missing lora": (lambda r: [*DEMO, "--motion-lora", r / "nope.ckpt:0.5"],
                     "motion_lora: "),
    "unknown config key": (lambda r: [*DEMO, "generate.stepz=3"],
                           "unknown config key 'generate.stepz'"),
    "top-level frames": (lambda r: [*DEMO, "frames=3"], "did you mean 'generate.frames'"),
    "size not multiple of 8": (lambda r: [*DEMO, "size=100"], "not a multiple of 8"),
    "bad scheduler": (lambda r: [*DEMO, "scheduler.beta_schedule=cosine"],
                      "scheduler: unsupported beta_schedule='cosine'"),
    "tiny module, real model": (lambda r: ["--prompt", "p", "--motion-module", "builtin:tiny"],
                                "the tiny motion module fits only it"),
    "no prompt": (lambda r: [], "no prompt; expected --prompt TEXT"),
    "poses without controlnet": (lambda r: [*DEMO, "--poses", r], "go together"),
    "output under a file": (lambda r: [*DEMO, "--out", _under_a_file(r)],
                            "cannot create the output folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, out, capsys):
    make, phrase = BAD_INPUTS[case]
    argv = ["generate", "--out", out / "out" / "v.mp4", "compilation_cache=", *make(out)]
    before = listing(out)
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("freeanimate: error: ") and phrase in err, err
    assert "; expected " in err, err
    assert listing(out) == before


def test_trace_time_position_error_is_a_user_error(out, capsys, monkeypatch):
    # Without the early check the UNet itself refuses while tracing: still one line, no files.
    monkeypatch.setattr(cli_run, "check_motion_window", lambda *a, **k: None)
    rc, _, err = run(capsys, "generate", *DEMO, "generate.frames=40", "--quiet",
                     "--out", out / "out" / "v.mp4", "compilation_cache=")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "40 frames exceed the motion module's position table (32)" in err
    assert "; expected settings these models support (nothing written)" in err
    assert listing(out / "out") == []


def test_animate_motion_frames_must_divide_the_devices(out, capsys):
    rc, _, err = run(capsys, "animate", "--demo", "--frames", 12, "--motion-module",
                     "builtin:tiny", "--out", out / "out" / "v.mp4", "compilation_cache=",
                     *TINY_FAMILY)
    assert rc == 2 and "the poses: 12 frames do not divide over 8 devices" in err
    assert listing(out / "out") == []


def test_unwritable_output_folder(out, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # works as root too
    rc, _, err = run(capsys, "generate", *DEMO, "--out", out / "out" / "new" / "v.mp4",
                     "compilation_cache=")
    assert rc == 2 and "output folder is not writable (PermissionError)" in err
    assert len(err.splitlines()) == 1 and listing(out / "out") == []


def test_nan_result_writes_nothing(fake, out, capsys, monkeypatch):
    def nan_frames(self, prompt, size_hw, poses=None):
        return GenerateResult(np.full((self.settings.frames, *size_hw, 3), np.nan), {})

    monkeypatch.setattr(FakeGenerate, "__call__", nan_frames)
    rc, _, err = run(capsys, "generate", *DEMO, "--out", out / "out" / "v.mp4", "--quiet",
                     "compilation_cache=")
    assert rc == 2 and "NaN/inf values (16 of 16 frames; nothing written)" in err
    assert listing(out / "out") == []


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--motion-module" in text and "generate.KEY" in text and "scheduler.KEY" in text



# -- flags users know, against the overrides they stand for -------------------------------------
def _record_and_frames(capsys, out: Path, *argv) -> tuple[dict, np.ndarray]:
    rc, _, err = run(capsys, "generate", "--demo", "--prompt", "a cat", "--quiet",
                     "--out", out, "compilation_cache=", *argv)
    assert (rc, err) == (0, ""), err
    return json.loads(out.with_suffix(".json").read_text()), read_video(out)[0]


def test_flags_and_overrides_give_the_same_settings_and_frames(out, capsys):
    by_flags, frames_f = _record_and_frames(
        capsys, out / "flags.npz", "--steps", 2, "--guidance-scale", 3, "--seed", 5,
        "--num-frames", 8, "--scheduler", "euler")
    by_keys, frames_k = _record_and_frames(
        capsys, out / "keys.npz", "generate.steps=2", "generate.guidance_scale=3",
        "generate.seed=5", "generate.frames=8", "generate.scheduler=euler")
    assert by_flags["config"] == by_keys["config"]
    assert by_flags["config"]["generate"]["steps"] == 2
    assert by_flags["config"]["generate"]["scheduler"] == "euler"
    np.testing.assert_array_equal(frames_f, frames_k)
    assert frames_f.shape == (8, 64, 64, 3)
    src_f, src_k = by_flags["config_sources"], by_keys["config_sources"]
    for key in ("generate.steps", "generate.guidance_scale", "generate.seed", "generate.frames",
                "generate.scheduler"):
        assert (src_f[key], src_k[key]) == ("flag", "override"), key
    assert src_f["model"] == "demo" and src_f["generate.eta"] == "default"


def test_a_flag_and_an_override_of_one_key_the_later_wins():
    from freeanimate_jax import config as cfg
    from freeanimate_jax.config import GenerateJob

    parser = cli.build_parser()

    def load(*argv):
        args, extra = parser.parse_known_args(["generate", "--out", "x.mp4", *argv])
        args.argv = ["generate", "--out", "x.mp4", *argv]
        return cfg.load_job_sourced(None, cli_run.job_items(args, GenerateJob,
                                                            [*args.overrides, *extra]),
                                    schema=GenerateJob)

    job, src = load("--steps", "7", "generate.steps=9")
    assert job.generate.steps == 9 and src["generate.steps"] == "override"
    job, src = load("generate.steps=9", "--num-inference-steps", "7")
    assert job.generate.steps == 7 and src["generate.steps"] == "flag"
    job, _ = load("--num-inference-steps", "20", "generate.steps=5", "--steps", "10")
    assert job.generate.steps == 10  # two spellings of one flag: the later one counts
    job, _ = load("--width", "96", "--height", "64", "--fps", "12")
    assert job.size == [64, 96] and job.fps == 12.0
    job, _ = load("--size", "256", "size=[128,64]")
    assert job.size == [128, 64]
    with pytest.raises(cfg.ConfigError, match="--width and --height go together"):
        load("--width", "96")
    # No abbreviations: `--guid` is not --guidance-scale (its place could not be told).
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--guid", "9", "--out", "x.mp4"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["animate", "--help"],
                                  ["generate", "--stepz", "3", "--out", "x.mp4"]])
def test_help_and_bad_flags_answer_without_jax(argv):
    """In a fresh process: `--help` shows the defaults, and neither it nor a bad flag imports
    JAX."""
    code = ("import sys\nfrom freeanimate_jax.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('JAX_LOADED' if 'jax' in sys.modules else 'NO_JAX', rc)")
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       timeout=120)
    took = time.perf_counter() - start
    assert p.stdout.split()[-2:] == ["NO_JAX", "2" if "--stepz" in argv else "0"], p.stderr
    if argv == ["generate", "--help"]:
        for default in ("(default: 25)", "(default: 7.5)", "(default: ddim)",
                        "stable-diffusion-v1-5/stable-diffusion-v1-5",
                        "guoyww/animatediff-motion-adapter-v1-5-2"):
            # argparse wraps lines, at hyphens too: compare without whitespace
            assert default.replace(" ", "") in "".join(p.stdout.split()), default
    if "--stepz" in argv:
        assert "unrecognized arguments: --stepz" in p.stderr
    assert took < 20, took  # a loaded 2-core host; about 1 s idle
