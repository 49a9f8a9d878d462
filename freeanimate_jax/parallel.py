"""Meshes, shardings and multi-host start-up: the only module that knows device counts.

Inference shards frames over the mesh axis `frames` (and independent videos over `data`);
weights and the reference are replicated. A frame count the `frames` axis does not divide is
padded up by repeating the last frame; the padded frames are computed and dropped (each frame's
noise depends only on its own index, so padding never changes the real frames).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FRAMES, DATA = "frames", "data"


def make_mesh(frames: int | None = None, data: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, frames) mesh over `devices` (default: all); `frames` defaults to the rest."""
    devices = list(devices if devices is not None else jax.devices())
    if frames is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide {len(devices)} devices")
        frames = len(devices) // data
    if frames * data > len(devices):
        raise ValueError(f"mesh data={data} x frames={frames} needs {frames * data} devices, "
                         f"have {len(devices)}")
    grid = np.array(devices[:frames * data], dtype=object).reshape(data, frames)
    return Mesh(grid, (DATA, FRAMES))


def frames_spec(ndim: int, axis: int = 0) -> P:
    """Shard `axis` (the frame axis) over both mesh axes; everything else replicated."""
    spec = [None] * ndim
    spec[axis] = (DATA, FRAMES)
    return P(*spec)


def frame_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, frames_spec(ndim, axis))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_frames(n: int, mesh: Mesh) -> int:
    """The frame count the mesh computes for `n` real frames (a multiple of its size)."""
    return math.ceil(n / mesh.size) * mesh.size


def pad_frames(x: np.ndarray, n_padded: int, axis: int = 0) -> np.ndarray:
    """Repeat the last frame up to `n_padded` frames."""
    n = x.shape[axis]
    if n_padded == n:
        return x
    last = np.take(x, [n - 1], axis=axis)
    return np.concatenate([x, np.repeat(last, n_padded - n, axis=axis)], axis=axis)


def shard_frames(tree, mesh: Mesh, axis: int = 0):
    return jax.tree.map(lambda a: jax.device_put(a, frame_sharding(mesh, np.ndim(a), axis)), tree)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def replicate_models(models, mesh: Mesh | None) -> None:
    """Put each model's weights on every device of `mesh`, in place, once: jit would otherwise
    copy them from the first device at every call, and that device would hold them twice.
    Models with abstract weights (fit checks) and runs without a mesh are left as they are."""
    from flax import nnx

    if mesh is None:
        return
    target = replicated(mesh)
    for model in models:
        if model is None:
            continue
        state = nnx.state(model)
        leaves = jax.tree.leaves(state)
        if not all(isinstance(x, jax.Array) for x in leaves):
            continue
        if all(x.sharding.is_equivalent_to(target, x.ndim) for x in leaves):
            continue
        nnx.update(model, replicate(state, mesh))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as NumPy on this process, also when its shards live on other hosts'
    devices (a multi-host job: every process calls this, and every process gets it all)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize_distributed() -> None:
    """Join a multi-host job (Cloud TPU pod, or processes given coordinator env vars).

    On a TPU pod `jax.distributed.initialize()` discovers everything; elsewhere it needs
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (CPU processes then talk
    through gloo). Call before anything touches a device.
    """
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        try:
            num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: expected JAX_NUM_PROCESSES and "
                             "JAX_PROCESS_ID as integers too") from None
        # Cross-process collectives on CPU (tests, a laptop cluster); TPUs and GPUs ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=num, process_id=pid)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize()
    else:
        raise ValueError("a multi-host run needs a TPU pod (TPU_WORKER_HOSTNAMES) or "
                         "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")


# Logical axes that layers may name at block boundaries; how they map to the mesh lives here.
LOGICAL_RULES = {"frames": (DATA, FRAMES), "temporal_tokens": (DATA, FRAMES)}


def constrain(x: jax.Array, logical: str) -> jax.Array:
    """Shard the leading axis of `x` as the logical axis `logical` under the current mesh.

    A no-op without a mesh (`jax.set_mesh`) or where the mesh does not divide the axis. Motion
    modules call it so temporal attention sees all frames of a pixel on one device: XLA turns
    the change from frame-sharded to token-sharded into an all-to-all.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = LOGICAL_RULES[logical]
    if mesh.empty or not all(a in mesh.axis_names for a in axes):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))
