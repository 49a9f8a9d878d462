"""run_tpu.sh prints the exact gcloud commands under DRY_RUN=1, and its babysit loop survives
a preemption against a fake gcloud that runs the commands here."""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "run_tpu.sh"
FAKE = Path(__file__).resolve().parent / "fake_gcloud.py"


def _dry(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DRY_RUN="1", TPU_NAME="fa-test", ZONE="us-west4-a",
               ACCELERATOR="v5litepod-8")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, cwd=SCRIPT.parent)


def test_create_names_the_accelerator_and_zone():
    out = _dry("create")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gcloud compute tpus tpu-vm create fa-test")
    assert "--accelerator-type=v5litepod-8" in out.stdout and "--zone=us-west4-a" in out.stdout


def test_run_reaches_every_worker_with_distributed_on():
    out = _dry("run", "animate", "--demo", "--out", "out dir/demo.mp4")
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout and "FREEANIMATE_DISTRIBUTED=1" in out.stdout
    assert "animate" in out.stdout and "demo.mp4" in out.stdout


def test_sync_setup_logs_stop_delete_print_commands():
    for cmd in ("sync", "setup", "logs", "stop", "delete"):
        out = _dry(cmd)
        assert out.returncode == 0, (cmd, out.stderr)
        assert "gcloud compute tpus tpu-vm" in out.stdout


def test_unknown_command_exits_2_and_run_needs_arguments():
    assert _dry("launch").returncode == 2
    out = _dry("run")
    assert out.returncode == 2 and "needs a freeanimate command" in out.stderr


def test_train_and_babysit_print_their_commands():
    out = _dry("train", "--out", "gs://bucket/run", "--config", "configs/train_motion_v3.yaml")
    assert out.returncode == 0, out.stderr
    tokens = shlex.split(out.stdout)
    assert "--worker=all" in tokens
    remote = shlex.split(next(t for t in tokens if t.startswith("--command=")).split("=", 1)[1])
    inner = remote[remote.index("bash") + 2]  # what nohup runs on every worker (bash -c ...)
    # The bucket is mounted with gcsfuse on every worker first; the run writes to the mount.
    mount = remote[:remote.index("cd")]
    assert "gcsfuse" in mount and "~/gcs/bucket" in mount and mount[:3] == ["mkdir", "-p",
                                                                          "~/gcs/bucket"]
    assert inner.startswith("FREEANIMATE_DISTRIBUTED=1 ~/venv/bin/freeanimate train run "
                            "--config configs/train_motion_v3.yaml "
                            "train.output_dir=../gcs/bucket/run")
    local = _dry("train", "--out", "runs/v3", "--demo")
    assert "gcsfuse" not in local.stdout and "train.output_dir=runs/v3" in local.stdout
    assert "> ~/freeanimate.done" in inner
    out = _dry("babysit", "--out", "gs://bucket/run", "--demo")
    assert out.returncode == 0, out.stderr
    for step in ("tpu-vm delete", "tpu-vm create", "tpu-vm scp", "git archive"):
        assert step in out.stdout, step
    assert _dry("train", "--demo").returncode == 2  # --out first
    spot = subprocess.run(["bash", str(SCRIPT), "create"], capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1", SPOT="1", QUEUED="1"))
    assert "queued-resources create" in spot.stdout and "--spot" in spot.stdout


@pytest.mark.slow
def test_babysit_recreates_a_preempted_slice_and_the_run_resumes(tmp_path):
    """The whole cycle against a fake gcloud whose ssh runs commands here: create, setup,
    sync, train; a preemption (slice PREEMPTED, its processes SIGKILLed) after a checkpoint;
    babysit deletes, re-creates, sets up, syncs and restarts the same command, which resumes
    from the checkpoint and completes; babysit exits 0."""
    bin_dir, state = tmp_path / "bin", tmp_path / "gcloud"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR":
           str(state), "TPU_NAME": "fa-test", "POLL": "1", "VENV": str(Path(sys.prefix)),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for key in ("TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY", "TPU_ACCELERATOR_TYPE"):
        env.pop(key, None)  # set for libtpu by conftest; they would mean "a TPU pod" here
    out = tmp_path / "run"  # stands for the gs:// bucket the slices share
    args = ["--out", str(out), "--demo", "train.max_steps=8", "train.ckpt_every=2",
            "train.log_every=1", "val.every=0", "train.tensorboard=false", "data.frames=4",
            "data.synthetic_videos=16", f"compilation_cache={tmp_path / 'xla'}"]
    with open(tmp_path / "babysit.log", "w") as log:
        proc = subprocess.Popen(["bash", str(SCRIPT), "babysit", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=SCRIPT.parent)
        deadline = time.time() + 600
        while not (out / "checkpoints" / "4").is_dir():  # a complete checkpoint
            assert proc.poll() is None, (tmp_path / "babysit.log").read_text()
            assert time.time() < deadline, "no checkpoint of step 4"
            time.sleep(1)
        subprocess.run([str(fake), "fake-preempt", "fa-test"], env=env, check=True)
        assert proc.wait(timeout=600) == 0, (tmp_path / "babysit.log").read_text()
    said = (tmp_path / "babysit.log").read_text()
    assert "no slice fa-test; creating it" in said
    assert "slice PREEMPTED; re-creating it" in said and "training completed" in said
    calls = (state / "calls.log").read_text().splitlines()
    verbs = [c.split()[3] for c in calls if c.startswith("compute tpus tpu-vm")
             and c.split()[3] in ("create", "delete", "scp")]
    assert verbs == ["create", "scp", "delete", "create", "scp"], verbs
    worker_log = (state / "slices" / "fa-test" / "home" / "freeanimate.log").read_text()
    resumed = int(worker_log.split("resumed from the checkpoint of step ")[1].split()[0])
    assert resumed >= 4 and "done: step 8" in worker_log
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the resumed run rewrote the steps after its checkpoint
