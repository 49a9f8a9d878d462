"""A multi-host job, as run_tpu.sh starts one on a pod, simulated by two processes on this
machine (4 CPU devices each, gloo between them): the same video as one process with 8."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from freeanimate_jax.io import read_video
from tests.helpers import free_port, process_env

ARGS = ["animate", "--demo", "animate.steps=2", "animate.preview_steps=2", "frames=8"]




def _cmd(out) -> list[str]:
    return [sys.executable, "-m", "freeanimate_jax", *ARGS[:2], "--out", str(out), *ARGS[2:]]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        _cmd(tmp_path / f"host{i}" / "demo.mp4"), cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=process_env(4, FREEANIMATE_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))) for i in range(2)]
    logs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"{out}\n{err}"
    single = subprocess.run(_cmd(tmp_path / "single" / "demo.mp4"), cwd=tmp_path, text=True,
                            capture_output=True, env=process_env(8), timeout=900)
    assert single.returncode == 0, single.stderr

    # Process 0 writes; process 1 computed its half and wrote nothing.
    assert not list((tmp_path / "host1").glob("*")), "process 1 wrote outputs"
    assert "process 0 writes the outputs" in logs[1][0]
    record = json.loads((tmp_path / "host0" / "demo.json").read_text())
    assert record["runtime"]["mesh"] == {"data": 1, "frames": 8}
    # One global 8-device mesh either way: the same program, the same numbers. The contact
    # sheet is lossless (preview and result frames), the video re-encodes them identically.
    sheets = [np.asarray(Image.open(tmp_path / d / "demo.sheet.png"))
              for d in ("host0", "single")]
    np.testing.assert_array_equal(sheets[0], sheets[1])
    videos = [read_video(tmp_path / d / "demo.mp4")[0] for d in ("host0", "single")]
    assert videos[0].shape == (8, 64, 64, 3)
    np.testing.assert_array_equal(videos[0], videos[1])


def test_distributed_without_a_coordinator_is_one_line(tmp_path):
    proc = subprocess.run(_cmd(tmp_path / "demo.mp4"), cwd=tmp_path, text=True,
                          capture_output=True, env=process_env(1, FREEANIMATE_DISTRIBUTED="1"),
                          timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "JAX_COORDINATOR_ADDRESS" in err[0] and "FREEANIMATE_DISTRIBUTED" in err[0]
