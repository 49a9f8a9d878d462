"""Meshes, sharding rules and multi-host start-up: the only module that knows device counts.

Inference shards frames over the mesh axes (`data`, `frames`); weights and the reference are
replicated. A frame count the mesh does not divide is padded up by repeating the last frame;
the padded frames are computed and dropped (each frame's noise depends only on its own index,
so padding never changes the real frames).

Layers never look up a mesh. They name *logical* axes at block boundaries (a motion module
names the axis of its temporal tokens) through the `Layout` they receive in their static
runtime policy (`runtime(mesh)`); the `MeshLayout` here maps logical axes to mesh axes with a
rules table and raises when a layer names an axis the table has no rule for, or a rule names a
mesh axis the mesh lacks. A dimension the mapped mesh axes do not divide is replicated (a tiny
UNet level, the single reference latent): that is the rule, stated once here.

Every pipeline stage runs under `use(mesh)`, entered by the sampling core
(`pipelines/core.py`), and `fit` lowers those same stages through the same entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from freeanimate_jax.models.attention import KERNEL_FOR_PLATFORM, Runtime

FRAMES, DATA = "frames", "data"

# Logical axis -> mesh axes, for inference meshes (data, frames). `frames` is the leading
# (batch x frames) axis of every UNet / ControlNet / VAE activation; `temporal_tokens` the
# leading (batch x pixels) axis of a motion module's temporal attention.
INFERENCE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("frames", (DATA, FRAMES)),
    ("temporal_tokens", (DATA, FRAMES)),
)
# A data-parallel mesh (training): whole videos per device, so frames stay together and the
# motion modules' temporal tokens are sharded like the videos.
DATA_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("frames", (DATA,)),
    ("temporal_tokens", (DATA,)),
)


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


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training mesh: every device on `data` (whole clips per device), frames 1. The run
    (`freeanimate train run`) and `fit train` both make it here."""
    devices = list(devices if devices is not None else jax.devices())
    return make_mesh(frames=1, data=len(devices), devices=devices)


def use(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """The one mesh context every pipeline stage (and every fit lowering of it) runs under."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """Logical axes -> mesh axes on one mesh (hashable: part of jit's cache key)."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...] = INFERENCE_RULES

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        table = dict(self.rules)
        if logical not in table:
            raise ValueError(f"no sharding rule for the logical axis {logical!r} on a mesh "
                             f"with axes {self.mesh.axis_names}; rules cover "
                             f"{', '.join(table) or 'nothing'}")
        axes = table[logical]
        missing = [a for a in axes if a not in self.mesh.axis_names]
        if missing:
            raise ValueError(f"the sharding rule {logical!r} -> {axes} names mesh axes "
                             f"{missing} that the mesh {self.mesh.axis_names} lacks")
        return axes

    def spec(self, shape: Sequence[int], logical: Sequence[str | None]) -> P:
        """PartitionSpec for an array of `shape` whose dims are named `logical` (None:
        replicated); a dim its mesh axes do not divide is replicated."""
        if len(logical) != len(shape):
            raise ValueError(f"{len(logical)} logical axes {tuple(logical)} for a "
                             f"{len(shape)}-d array")
        out = []
        for size, name in zip(shape, logical, strict=True):
            axes = self.mesh_axes(name) if name is not None else ()
            n = math.prod(self.mesh.shape[a] for a in axes)
            out.append(axes if axes and size % n == 0 else None)
        return P(*out)

    def sharding(self, shape: Sequence[int], logical: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(shape, logical))

    def constrain(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(x.shape, logical))

    def frame_axis(self, shape: Sequence[int], axis: int | None) -> NamedSharding:
        """Where a pipeline buffer lives: its frame axis `axis` named `frames`, or replicated
        (`axis` None)."""
        logical: list[str | None] = [None] * len(shape)
        if axis is not None:
            logical[axis] = "frames"
        return self.sharding(shape, logical)

    def per_shard(self, fn: Callable[..., jax.Array], *args: jax.Array, axis: str) -> jax.Array:
        """`fn` run on each device's slice of the leading axis (named `axis`) of every arg:
        Mosaic (Pallas TPU) kernels are not partitioned automatically."""
        spec = self.spec(args[0].shape[:1], (axis,))
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(spec,) * len(args), out_specs=spec,
                             check_vma=False)(*args)


def kernel_for(platform: str) -> str:
    """The attention kernel a platform runs: cuDNN on GPUs, Pallas flash on TPUs, else XLA."""
    return KERNEL_FOR_PLATFORM.get(platform, "xla")


def runtime(mesh: Mesh | None, *, kernel: str | None = None,
            rules: tuple[tuple[str, tuple[str, ...]], ...] = INFERENCE_RULES) -> Runtime:
    """The static runtime policy for models run on `mesh` (None: one device): the attention
    kernel of the mesh's platform (so an ahead-of-time compile for a TPU topology on a CPU host
    picks the TPU kernel, as the run on the TPU does) and the mesh's layout."""
    if kernel is None:
        platform = mesh.devices.flat[0].platform if mesh is not None else \
            jax.default_backend()
        kernel = kernel_for(platform)
    return Runtime(kernel=kernel, layout=MeshLayout(mesh, rules) if mesh is not None else None)


def check_frames(n: int, mesh: Mesh | None, what: str) -> None:
    """A video that must divide over the mesh (a motion module sees every frame, so padding
    would change it): ValueError naming `what` otherwise."""
    if mesh is not None and n % mesh.size:
        raise ValueError(f"{what}: {n} frames do not divide over {mesh.size} devices; expected "
                         f"a multiple of {mesh.size} (a motion module sees the whole video, so "
                         f"frames cannot be padded)")


def frames_spec(ndim: int, axis: int = 0,
                rules: tuple[tuple[str, tuple[str, ...]], ...] = INFERENCE_RULES) -> P:
    """Shard `axis` (the frame axis) as the logical axis `frames`; everything else replicated."""
    spec: list[Any] = [None] * ndim
    spec[axis] = dict(rules)["frames"]
    return P(*spec)


def frame_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, frames_spec(ndim, axis))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_frames(n: int, mesh: Mesh | None) -> int:
    """The frame count the mesh computes for `n` real frames (a multiple of its size)."""
    if mesh is None:
        return n
    return math.ceil(n / mesh.size) * mesh.size


def pad_frames(x: np.ndarray, n_padded: int, axis: int = 0) -> np.ndarray:
    """Repeat the last frame up to `n_padded` frames."""
    n = x.shape[axis]
    if n_padded == n:
        return x
    last = np.take(x, [n - 1], axis=axis)
    return np.concatenate([x, np.repeat(last, n_padded - n, axis=axis)], axis=axis)


def put(tree, shardings):
    """Host values (the same on every process) placed as global arrays by `shardings` (one
    sharding for every leaf, or a matching tree of them).

    On several processes each one fills its own devices' shards from its own copy, with no
    communication: `jax.device_put` would all-gather every leaf to check that the copies
    agree, one compiled collective per leaf, and the first of them times out (gloo waits 30 s)
    when the processes reach it far apart."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: a reshard
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def shard_frames(tree, mesh: Mesh | None, axis: int = 0):
    """Frames of every leaf sharded over the mesh on `axis` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda a: put(a, frame_sharding(mesh, np.ndim(a), axis)), tree)


def replicate(tree, mesh: Mesh):
    return put(tree, replicated(mesh))


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


# -- parameters ------------------------------------------------------------------------------
# (regex on the dotted parameter path, strategy): the first match wins; no match replicates.
# "replicate" keeps a full copy on every device; "fsdp" shards the largest dimension that the
# `data` axis divides over `data` (replicated when none does), as big_vision's `fsdp` does.
PARAM_STRATEGIES = ("replicate", "fsdp")
REPLICATED_PARAMS: tuple[tuple[str, str], ...] = ((".*", "replicate"),)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh,
               rules: Sequence[tuple[str, str]] = REPLICATED_PARAMS) -> P:
    """The PartitionSpec of one parameter by the first rule whose regex matches its path."""
    for pattern, strategy in rules:
        if strategy not in PARAM_STRATEGIES:
            raise ValueError(f"parameter rule ({pattern!r}, {strategy!r}): unknown strategy; "
                             f"expected one of {', '.join(PARAM_STRATEGIES)}")
        if not re.fullmatch(pattern, path):
            continue
        if strategy == "replicate":
            return P()
        if DATA not in mesh.axis_names:
            raise ValueError(f"parameter rule ({pattern!r}, 'fsdp') needs a {DATA!r} mesh "
                             f"axis; the mesh has {mesh.axis_names}")
        n = mesh.shape[DATA]
        dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
        for d in dims:
            if shape[d] % n == 0 and shape[d] >= n:
                spec: list[Any] = [None] * len(shape)
                spec[d] = DATA
                return P(*spec)
        return P()
    return P()


def param_shardings(state, mesh: Mesh, rules: Sequence[tuple[str, str]] = REPLICATED_PARAMS):
    """NamedShardings for every leaf of an nnx State (or any pytree of arrays), by path."""
    def one(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return NamedSharding(mesh, param_spec(name, np.shape(leaf), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, state)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as NumPy on this process, also when its shards live on other hosts'
    devices (a multi-host job: every process calls this, and every process gets it all)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:  # every device holds it all: no gather
            return np.asarray(x.addressable_data(0))
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
        if jax.default_backend() == "cpu":
            _connect_all_devices()
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize()
    else:
        raise ValueError("a multi-host run needs a TPU pod (TPU_WORKER_HOSTNAMES) or "
                         "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")




def _connect_all_devices() -> None:
    """Open gloo's communicators once, with the processes side by side.

    gloo sets up a communicator for a set of devices at its first collective and gives every
    process 30 s to arrive there; processes that traced and compiled a stage apart can be
    further apart than that by the first collective of a run (the gather of the frames, the
    first train step, orbax agreeing on a step), and the run fails. Opened here, right after a
    barrier of the coordination service (which waits as long as needed, without gloo), they are
    reused by every later collective: the one over all devices (every collective of our
    meshes), and those between the processes' devices of the same local index (the host-level
    gathers and broadcasts of `multihost_utils`, which orbax uses)."""
    from jax._src import distributed
    from jax.experimental import multihost_utils

    distributed.global_state.client.wait_at_barrier("freeanimate_connect", 15 * 60 * 1000)
    mesh = Mesh(np.array(jax.devices()), ("all",))
    n = mesh.size
    x = jax.make_array_from_callback((n,), NamedSharding(mesh, P("all")),
                                     lambda index: np.ones(n, np.float32)[index])
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    hosts = multihost_utils.process_allgather(np.ones(1, np.float32), tiled=True)
    assert float(total.addressable_data(0)) == n and hosts.shape == (jax.process_count(),)
