"""A runbook's training data: the source it names, split into per-host batches that add up to
one global batch over the mesh's `data` axis."""

from __future__ import annotations

from typing import Any

import jax

from freeanimate_jax.config import TrainJob
from freeanimate_jax.data.errors import DataError


def global_batch(job: TrainJob, devices: int) -> int:
    """`train.global_batch`, or `train.batch_per_chip` x devices; it must split evenly."""
    loop = job.sections()[3]
    batch = loop.global_batch or loop.batch_per_chip * devices
    if batch % devices:
        raise DataError(f"train.global_batch={batch} does not split over {devices} devices; "
                        f"expected a multiple of {devices}")
    if batch % jax.process_count():
        raise DataError(f"train.global_batch={batch} does not split over "
                        f"{jax.process_count()} hosts; expected a multiple of it")
    optim = job.sections()[2]
    if batch % optim.grad_accum:
        raise DataError(f"optim.grad_accum={optim.grad_accum} does not divide the global batch "
                        f"{batch}; expected a divisor")
    return batch


def source_of(job: TrainJob) -> Any:
    """The random-access rows `data.source` names."""
    data = job.sections()[0]
    size = job.size_hw[0]
    if data.source == "synthetic" and not data.dir:
        from freeanimate_jax.data.synthetic import SyntheticSource

        return SyntheticSource(num_videos=data.synthetic_videos,
                               num_frames=data.synthetic_frames, size=size)
    if data.source == "toy":
        from freeanimate_jax.toy.data import ToySource, open_prepared

        if data.dir:
            return open_prepared(data.dir, data.synthetic_videos, data.synthetic_frames, size)
        return ToySource(num_videos=data.synthetic_videos, num_frames=data.synthetic_frames,
                         size=size)
    if not data.dir:
        raise DataError(f"data.dir is empty for data.source={data.source}; expected the folder "
                        f"`freeanimate train prepare-data` (or `train cache`) wrote")
    if data.source == "latents":
        from freeanimate_jax.train.cache import LatentSource

        return LatentSource(data.dir)
    from freeanimate_jax.data.builder import open_source

    return open_source(data.dir, data.source, size=size, **_builder_config(job))


def _builder_config(job: TrainJob) -> dict[str, Any]:
    data = job.sections()[0]
    if data.source == "synthetic":
        return {"num_videos": data.synthetic_videos, "num_frames": data.synthetic_frames}
    return {}


def open_data(job: TrainJob, devices: int) -> Any:
    """Per-host batches (`.batch(step)`) of the global batch (`.global_batch`)."""
    data = job.sections()[0]
    loop = job.sections()[3]
    batch = global_batch(job, devices)
    source = source_of(job)
    kw = dict(frames=data.frames, stride=data.stride, size=job.size_hw[0], seed=loop.seed,
              batch_per_host=batch // jax.process_count())
    if data.source == "latents":
        from freeanimate_jax.train.cache import LatentData

        out = LatentData(source, **kw)
    else:
        from freeanimate_jax.data.pipeline import TrainData

        out = TrainData(source, hflip=data.hflip, **kw)
    out.global_batch = batch
    return out
