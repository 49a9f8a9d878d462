"""The platform a process picks when the user names none (freeanimate_jax/platform.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLEAN = ("JAX_PLATFORMS", "XLA_FLAGS", "TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES",
         "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or bool(os.listdir("/dev") and
                    any(n.startswith("accel") for n in os.listdir("/dev"))),
                    reason="a GPU or TPU host: the choice is cuda,cpu or JAX's own")
def test_a_host_without_tpus_picks_the_cpu_quietly_and_a_users_choice_stands():
    p = _run("import os, freeanimate_jax, jax; print(os.environ['JAX_PLATFORMS'], "
             "jax.default_backend(), 'jax' in __import__('sys').modules)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["cpu", "cpu", "True"]
    assert p.stderr == "", p.stderr  # libtpu is installed (test extra): no probe errors
    # Importing the package alone does not import JAX, and the user's setting is kept.
    p = _run("import os, sys, freeanimate_jax; print(os.environ['JAX_PLATFORMS'], "
             "'jax' in sys.modules)", JAX_PLATFORMS="cpu,tpu")
    assert p.stdout.split() == ["cpu,tpu", "False"], p.stderr
    # A TPU VM's runtime variables leave the choice to JAX.
    p = _run("import os, freeanimate_jax; print(os.environ.get('JAX_PLATFORMS'))",
             TPU_ACCELERATOR_TYPE="v5litepod-8")
    assert p.stdout.split() == ["None"], p.stderr
