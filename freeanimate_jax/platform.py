"""Which JAX platform a process uses when the user did not say, decided before JAX is imported.

With libtpu installed (the test extra, or a TPU wheel on a laptop) and no TPU present, JAX's TPU
plugin probes the cloud metadata and prints a block of errors ("Failed to find host bounds ...
INVALID_ARGUMENT ... Source Location Trace") before every run. So, unless `JAX_PLATFORMS` is
set: on a host without TPU devices, the platforms are `cuda,cpu` where the CUDA plugin and an
NVIDIA device are both present, else `cpu`. A TPU VM (accelerator devices, or the variables the
TPU runtime sets) is left to JAX. `fit` compiles for TPUs with libtpu's compile-only client
whatever the platform; `quiet_libtpu` answers libtpu's probes for it on a host without TPUs.
Environment variables only: importing this module does not import JAX.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os

_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID")


def tpu_present() -> bool:
    """A TPU VM: its accelerator devices (/dev/accel*, /dev/vfio/N) or the TPU runtime's
    variables."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or any(os.environ.get(k) for k in _TPU_ENV))


def _cuda_present() -> bool:
    plugin = any(importlib.util.find_spec(m) is not None
                 for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return plugin and os.path.exists("/dev/nvidiactl")


def settle() -> str | None:
    """Set `JAX_PLATFORMS` for a host without TPUs (see the module docstring); the value set,
    or None where the user's or JAX's choice stands."""
    if "JAX_PLATFORMS" in os.environ or tpu_present():
        return None
    rocm = any(importlib.util.find_spec(m) is not None
               for m in ("jax_rocm60_plugin", "jax_rocm7_plugin"))
    if rocm:  # leave AMD GPUs to JAX's own discovery
        return None
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if _cuda_present() else "cpu"
    global CHOSEN
    CHOSEN = True
    return os.environ["JAX_PLATFORMS"]


CHOSEN = False  # whether `settle` set JAX_PLATFORMS (rather than the user)


def user_chose() -> bool:
    """Whether JAX_PLATFORMS is the user's own setting."""
    return "JAX_PLATFORMS" in os.environ and not CHOSEN


def quiet_libtpu() -> None:
    """On a host without TPUs, answer the probes libtpu makes when `fit` loads its compile-only
    client (no metadata server, one local worker), instead of its error block."""
    if tpu_present():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


@contextlib.contextmanager
def no_torch_advice():
    """Around our first `import transformers`: we use its tokenizers only, so its advice that
    "PyTorch was not found. Models won't be available" misleads a JAX user; other warnings
    stand."""
    before = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = before
