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


def test_the_tiny_demo_models_build_in_seconds():
    """Drawn on the host (`layers.host_init`): one NumPy generator instead of one compiled JAX
    program per parameter shape (25-60 s before). In a fresh process, as the demo builds them."""
    code = ("import time\nfrom freeanimate_jax.demo import tiny_models, tiny_motion_adapter\n"
            "t = time.perf_counter(); m = tiny_models(0); a = tiny_motion_adapter()\n"
            "took = time.perf_counter() - t\n"
            "import jax, numpy as np\nfrom flax import nnx\n"
            "again = tiny_models(0)\n"
            "same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(nnx.state(m.unet)),"
            " jax.tree.leaves(nnx.state(again.unet))))\n"
            "other = tiny_models(1)\n"
            "differ = not np.array_equal(jax.tree.leaves(nnx.state(m.unet))[0],"
            " jax.tree.leaves(nnx.state(other.unet))[0])\n"
            "print(round(took, 2), same, differ)")
    p = _run(code, JAX_PLATFORMS="cpu")
    assert p.returncode == 0, p.stderr
    took, same, differ = p.stdout.split()
    assert (same, differ) == ("True", "True")  # deterministic per seed, and seeded
    assert float(took) < 10, took  # measured 5.7 s at load average 3.7 on the 2-core host
