"""The README's shell commands, run as written, as a new user would: from a fresh copy of the
repository (the files git would clone), the package installed once (this test environment's),
a Hugging Face cache (`HF_HOME`) seeded with tiny models under the hub ids the README names,
and the network off (`HF_HUB_OFFLINE=1`). Each command runs, or fails with one line naming the
one file the test leaves out (the v3 domain adapter, the DWPose person detector).

Every bash command in the README must be one of the commands named here (a new command fails
the first test until it is classified). Commands that would run for hours (a 100k-step
training recipe, a full-size TPU compile) are run as written until they are under way, then
stopped the way the README says they stop (SIGTERM: training saves and exits 0)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import tiny
from tests.helpers import hub_snapshot, process_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
OPENPOSE = "lllyasviel/control_v11p_sd15_openpose"
FRAMES = 2  # the poses folder the test gives: a short clip keeps SD-size runs quick

# README command (comments stripped, continuation lines joined) -> what it must do here.
DEMO = ".venv/bin/freeanimate animate --demo --out outputs/demo.mp4"
ANIMATE = ('freeanimate animate --reference person.png --poses poses/ --prompt "a woman in a red '
           'dress" --config configs/sd15_animate.yaml --out dance.mp4')
POSES = "freeanimate poses driving.mp4 --out poses/ --retarget-to person.png --smooth 5"
GENERATE_V3 = ('freeanimate generate --prompt "a corgi running on the beach" --config '
               'configs/animatediff_v3.yaml --out corgi.mp4')
GENERATE_DEMO = "freeanimate generate --demo --out outputs/generate.mp4"
ANIMATE_MOTION = ('freeanimate animate --reference person.png --poses poses/ --prompt "a woman in '
                  'a red dress" --motion-module guoyww/animatediff-motion-adapter-v1-5-2 --out '
                  'dance-motion.mp4')
FITS = ("freeanimate fit animate --topology v5e-8 --frames 16 --size 512",
        "freeanimate fit generate --topology v5e-8 --frames 16 --size 512",
        "freeanimate fit train --topology v5e-8 --frames 16 --size 256")
BABYSIT = ("SPOT=1 ./run_tpu.sh babysit --out gs://my-bucket/runs/v3 --config "
           "configs/train_motion_v3.yaml")
TRAIN = ('pip install -e ".[train]"',
         "freeanimate train run --demo",
         "freeanimate train prepare-data --config configs/train_motion_v3.yaml "
         "data.manual_dir=webvid/",
         "freeanimate train cache --config configs/train_motion_v3.yaml --out "
         "data/webvid-latents",
         "freeanimate train run --config configs/train_motion_v3.yaml data.source=latents "
         "data.dir=data/webvid-latents",
         "freeanimate train export --run runs/motion-v3 --out my-motion-adapter")
TOY = ("freeanimate toy build --out runs/toy", "freeanimate toy pack --out runs/toy",
       "freeanimate toy ablation --out runs/ablation",
       "freeanimate eval runs/ablation --out runs/ablation/table.md")
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip '
                'install -e ".[test]" && JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q')
INSTALL_DEMO = "python3 -m venv .venv && .venv/bin/pip install -e . && "


def readme_commands() -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line)  # a trailing comment
            line = " ".join(line.split())
            if line:
                out.append(line)
    return out


def test_every_readme_command_is_classified_here():
    expected = [INSTALL_DEMO + DEMO, TEST_COMMAND, ANIMATE, POSES, GENERATE_V3, GENERATE_DEMO,
                ANIMATE_MOTION, *FITS, BABYSIT, *TRAIN, *TOY]
    assert sorted(readme_commands()) == sorted(expected)


# -- the world a new user has: a clone, an installed package, a seeded hub cache -----------
_seed = hub_snapshot


# The seeded UNet and ControlNet attend at their 2x-downsampled level only: at the runbooks'
# 512 px a full-resolution level's 4096-token attention on CPU (XLA materialises the scores,
# RA-SA doubles the keys) takes gigabytes a CI host does not have.
# One layer per block keeps their compiles short.
LOW_ATTENTION = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1)
SEED_UNET = dict(tiny.SD1_UNET, **LOW_ATTENTION,
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
SEED_CONTROLNET = dict(tiny.CONTROLNET, **LOW_ATTENTION)


def _sd_pipeline(tmp: Path, folder: Path) -> None:
    """The tiny SD 1.x pipeline with a VAE that downsamples 8x, as SD's does (the runbooks'
    512 px stay 64x64 latents), and a UNet that attends at 32x32."""
    import diffusers

    pipe = tiny.save_sd_pipeline(tmp, folder)
    shutil.rmtree(folder / "unet")
    tiny.save_unet(folder / "unet", seed=4, **SEED_UNET)
    vae = tiny.randomize(diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
        latent_channels=4, sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4), 3)
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae")
    del pipe


def _clone(dst: Path) -> None:
    """The files a fresh clone has: git's tracked files (not what a run left in this checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: a fresh clone's files are unknown")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


# A standing figure (OpenPose-18, 256x512 canvas) whose arms rise frame by frame.
BODY = [(128, 60), (128, 110), (98, 110), (88, 170), (84, 230), (158, 110), (168, 170),
        (172, 230), (108, 250), (104, 350), (102, 450), (148, 250), (152, 350), (154, 450),
        (120, 50), (136, 50), (112, 56), (144, 56)]


def _poses(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        points = [(x, y - (40 * i if j in (3, 4, 6, 7) else 0), 1.0) for j, (x, y) in
                  enumerate(BODY)]
        frame = {"people": [{"pose_keypoints_2d": [v for p in points for v in p]}],
                 "canvas_width": 256, "canvas_height": 512}
        (folder / f"frame_{i:04d}.json").write_text(json.dumps(frame))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not (Path(sys.prefix) / "bin" / "freeanimate").is_file():
        pytest.skip("the package's command is not installed in this environment")
    from freeanimate_jax.io.video import write_video
    from freeanimate_jax.pose.detect import DWPOSE_INPUT
    from tests.test_poses import pose_onnx

    base = tmp_path_factory.mktemp("readme")
    clone, hub = base / "freeanimate-jax", base / "hf" / "hub"
    clone.mkdir()
    _clone(clone)
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)  # installed once
    _sd_pipeline(base, _seed(hub, SD))
    tiny.save_controlnet(_seed(hub, OPENPOSE), **SEED_CONTROLNET)
    for version in (2, 3):
        tiny.save_motion_adapter(_seed(hub, f"guoyww/animatediff-motion-adapter-v1-5-{version}"),
                                 **dict(tiny.MOTION_ADAPTER, motion_layers_per_block=1))
    # DWPose's pose model is here; its person detector (yolox_l.onnx) is the file left out.
    pose_onnx(_seed(hub, "yzd-v/DWPose") / "dw-ll_ucoco_384.onnx", DWPOSE_INPUT)

    # The user's own files: a photo, a pose folder, a driving video, a WebVid-layout folder.
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (96, 64, 3), np.uint8)).save(clone / "person.png")
    _poses(clone / "poses", FRAMES)
    write_video(clone / "driving.mp4", rng.random((4, 64, 48, 3), np.float32), 8.0)
    webvid = clone / "webvid"
    webvid.mkdir()
    # Four videos of 64 frames: the recipe's clips (16 frames at stride 4), one batch of 4.
    (webvid / "results.csv").write_text(
        "videoid,name,page_dir\n" + "".join(f"{i},clip {i},p\n" for i in range(4)))
    for vid in map(str, range(4)):
        write_video(webvid / f"{vid}.mp4", rng.random((64, 40, 40, 3), np.float32), 8.0)

    # A new user's process: one CPU device, no TPU variables, no warm compilation cache.
    env = {k: v for k, v in process_env(1).items() if not k.startswith(("HF_", "JAX_COMP"))}
    env.update(HF_HOME=str(hub.parent), HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(base / "xdg"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return clone, env


def run(world, command: str, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    clone, base_env = world
    return subprocess.run(["bash", "-c", command], cwd=clone, env={**base_env, **env},
                          capture_output=True, text=True, timeout=timeout)


def start(world, command: str, **env) -> subprocess.Popen:
    clone, base_env = world
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=clone,
                            env={**base_env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.seen = ""
    return proc


def _video_frames(path: Path) -> int:
    from freeanimate_jax.io.video import read_video

    return len(read_video(path)[0])


@pytest.mark.slow
def test_readme_animate_commands_run(world):
    clone, _ = world
    for command, out in ((ANIMATE, "dance"), (ANIMATE_MOTION, "dance-motion")):
        p = run(world, command)
        assert p.returncode == 0, p.stderr[-3000:]
        assert _video_frames(clone / f"{out}.mp4") == FRAMES
        record = json.loads((clone / f"{out}.json").read_text())
        assert record["config"]["motion_module"] == ("" if out == "dance" else
                                                     "guoyww/animatediff-motion-adapter-v1-5-2")
        assert record["config"]["model"] == SD and record["config"]["controlnet"] == OPENPOSE
        assert (clone / f"{out}.sheet.png").is_file()


@pytest.mark.slow
def test_readme_demo_commands_run(world):
    clone, _ = world
    p = run(world, DEMO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"demo.mp4", "demo.sheet.png", "demo.json"} <= {f.name for f in
                                                          (clone / "outputs").iterdir()}
    p = run(world, GENERATE_DEMO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _video_frames(clone / "outputs" / "generate.mp4") > 1


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_readme_commands_needing_a_download_name_the_file(world):
    clone, _ = world
    line = _one_line_error(run(world, GENERATE_V3))
    assert "v3_sd15_adapter.ckpt" in line and "guoyww/animatediff" in line
    assert not list(clone.glob("corgi*"))
    before = sorted(p.name for p in (clone / "poses").iterdir())
    shutil.move(clone / "poses", clone / "poses.given")  # a user starting from a video
    try:
        line = _one_line_error(run(world, POSES))
        assert "yolox_l.onnx" in line and "yzd-v/DWPose" in line
        assert not (clone / "poses").exists()  # nothing half-written
    finally:
        shutil.move(clone / "poses.given", clone / "poses")
    assert sorted(p.name for p in (clone / "poses").iterdir()) == before


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float, until=None) -> bool:
    """Wait until a line of the process's output matches `pattern` or `until()` holds (True),
    or the process ends or the time runs out (False). Lines are matched whole: the output is
    read into a buffer kept on `proc.seen`."""
    fd, deadline = proc.stdout.fileno(), time.monotonic() + timeout
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 16).decode(errors="replace")
        except BlockingIOError:  # nothing new yet
            chunk = ""
        proc.seen += chunk
        lines = proc.seen.splitlines()[: proc.seen.count("\n")]  # complete lines only
        if any(re.search(pattern, line) for line in lines) or (until is not None and until()):
            return True
        if not chunk and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """SIGTERM to the process group (unless it ended by itself): (exit code, its output)."""
    os.set_blocking(proc.stdout.fileno(), True)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
    return proc.returncode, proc.seen + (rest or b"").decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("command", FITS)
def test_readme_fit_commands_get_to_the_compiler(world, command):
    """A full-size TPU compile takes tens of minutes on 2 cores (docs/PERFORMANCE.md): the
    command runs as written until its first stage is handed to the compiler."""
    proc = start(world, command)
    try:
        started = _wait_for(proc, r"^\[fit\] .*compiling", timeout=600)
    finally:  # whatever happened, no compile is left running
        code, out = _stop(proc, timeout=60)
    assert started, f"exit {code}:\n{out[-3000:]}"


@pytest.mark.slow
def test_readme_babysit_prints_its_gcloud_commands(world):
    """babysit needs a Google Cloud project: under DRY_RUN=1 (README) it prints each command."""
    p = run(world, BABYSIT, DRY_RUN="1", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = p.stdout.replace("\\", "")  # printf %q's escapes
    for expected in ("gcloud compute tpus tpu-vm create freeanimate", "--spot",
                     "gcsfuse --implicit-dirs my-bucket",
                     "train run --config configs/train_motion_v3.yaml"):
        assert expected in printed, expected


@pytest.mark.slow
def test_readme_training_commands_run(world):
    clone, _ = world
    _install, demo, prepare, cache, train, export = TRAIN  # the test extra includes train's
    p = run(world, demo)
    assert p.returncode == 0, p.stderr[-3000:]
    for command in (prepare, cache):
        p = run(world, command)
        assert p.returncode == 0, p.stderr[-3000:]
    # The 100k-step recipe: under way once its first step is logged, then stopped as the
    # README says (SIGTERM saves and exits 0).
    log = clone / "runs" / "motion-v3" / "metrics.jsonl"
    proc = start(world, train)
    try:
        started = _wait_for(proc, r"\bstep\b.*loss", timeout=900,
                            until=lambda: log.is_file() and log.read_text().strip())
    finally:
        code, out = _stop(proc)
    assert started and code == 0, f"exit {code}:\n{out[-3000:]}"
    assert "SIGTERM: saved step" in out
    metrics = log.read_text().splitlines()
    assert metrics and np.isfinite(json.loads(metrics[0])["loss"])
    p = run(world, export)
    assert p.returncode == 0, p.stderr[-3000:]
    from diffusers import MotionAdapter

    adapter = MotionAdapter.from_pretrained(clone / "my-motion-adapter")
    assert sum(p.numel() for p in adapter.parameters()) > 0


@pytest.mark.slow
def test_readme_toy_commands_run_and_stop_as_the_readme_says(world):
    """The recipe takes hours on a CPU (docs/QUALITY.md) and the ablation about one: each
    runs as written until under way, then stops the README's way (SIGTERM: the build saves and
    exits 75, resumable). pack and eval of the unfinished runs fail with one line, exit 2, and
    write nothing."""
    from freeanimate_jax.toy.family import SHIPPED, verify

    clone, _ = world
    build, pack, ablation, evaluate = TOY
    proc = start(world, build)
    try:
        started = _wait_for(proc, r"\bstep\b.*loss", timeout=600)
    finally:
        code, out = _stop(proc)
    assert started and code == 75, f"exit {code}:\n{out[-3000:]}"
    assert "run the same command to resume" in out
    assert list((clone / "runs" / "toy" / "vae" / "checkpoints").iterdir())
    line = _one_line_error(run(world, pack))
    assert "stage vae is not finished" in line
    verify(SHIPPED)  # the shipped family untouched
    proc = start(world, ablation)
    try:
        started = _wait_for(proc, r"^\[ablation\] 1/", timeout=600)
    finally:
        code, out = _stop(proc)
    assert started, f"exit {code}:\n{out[-3000:]}"
    assert list((clone / "runs" / "ablation" / "videos").glob("*.npz"))
    line = _one_line_error(run(world, evaluate))
    assert "no set.json" in line and not (clone / "runs" / "ablation" / "table.md").exists()

