"""run_tpu.sh prints the exact gcloud commands under DRY_RUN=1."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "run_tpu.sh"


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
