"""The grain input pipeline: per-epoch shuffle -> global batch -> host slice -> decode.

Every batch is a pure function of (seed, step): `TrainData(...).batch(step)` is the same in a
fresh process, so resuming at a step needs no iterator state. Clip windows and flips are pure
functions of (seed, epoch, row). Works on a tfds data source (`builder.open_source`) or any
object with `__len__` / `__getitem__` returning `{"videoid", "caption", "frames"}` or
`{"videoid", "caption", "video_bytes"}` (either with an optional per-frame `condition`: control
images for ControlNet training); tensorflow is never imported here.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import cv2
import grain
import jax
import numpy as np

from freeanimate_jax.data.errors import DataError
from freeanimate_jax.data.video import decode_video, resize_short_side_and_crop

LOG = logging.getLogger("freeanimate_jax.data")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def clip_window(seed: int, index: int, n_total: int, frames: int, stride: int,
                epoch: int = 0) -> np.ndarray:
    """Indices of `frames` frames `stride` apart from a random start (pure of seed, epoch,
    index). A video too short for the stride gets the largest stride that fits; one with fewer
    than `frames` frames is a DataError (the pipeline then uses the next valid row)."""
    if n_total < frames:
        raise DataError(f"video has {n_total} frames; expected at least {frames}")
    if frames > 1 and (frames - 1) * stride + 1 > n_total:
        stride = max(1, (n_total - 1) // (frames - 1))
    span = (frames - 1) * stride + 1
    rng = np.random.default_rng((seed, epoch, index, 0))
    start = int(rng.integers(0, n_total - span + 1))
    return start + stride * np.arange(frames)


def flip_of(seed: int, index: int, epoch: int = 0) -> bool:
    """Whether the clip is mirrored (pure of seed, epoch, index; its own stream, so independent
    of the window)."""
    return bool(np.random.default_rng((seed, epoch, index, 1)).integers(2))


def mirror_caption(caption: str) -> str:
    """Swap the words left/right: a mirrored "moving left" clip moves right."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _frame(frame: Any) -> np.ndarray:
    """One stored frame: an RGB array, or encoded image bytes (JPEG/PNG)."""
    if isinstance(frame, (bytes, np.bytes_)):
        bgr = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError("a stored frame is not a decodable image; expected JPEG or PNG")
        return bgr[..., ::-1]
    return np.asarray(frame, np.uint8)


def _window(stored: Any, idx: np.ndarray, size: int) -> np.ndarray:
    clip = np.stack([_frame(stored[i]) for i in idx])
    return clip if clip.shape[1:] == (size, size, 3) else resize_short_side_and_crop(clip, size)


def decode_clip(record: dict, *, index: int, frames: int = 16, stride: int = 4,
                size: int = 256, hflip: bool = True, seed: int = 0, epoch: int = 0,
                max_frames: int | None = 64) -> dict[str, Any]:
    """One source row's clip: `pixels` float32 (F, size, size, 3) in [-1, 1], `caption`,
    `videoid`, and where the row stores control images (`condition`, per frame) the same
    window of them, flipped alike, float32 in [0, 1] (diffusers' ControlNet input range).

    The frame count is capped at `max_frames` in both storages (the builder's frames cap), so
    a row gives the same window whether it was stored as frames or as bytes.
    """
    if "frames" in record:
        stored = record["frames"]
        n = len(stored) if max_frames is None else min(len(stored), max_frames)
        idx = clip_window(seed, index, n, frames, stride, epoch)
        clip = _window(stored, idx, size)
    elif "video_bytes" in record:
        video = decode_video(bytes(record["video_bytes"]), max_frames=max_frames)
        idx = clip_window(seed, index, len(video), frames, stride, epoch)
        clip = resize_short_side_and_crop(video[idx], size)  # only the window is resized
    else:
        raise DataError(f"record has keys {sorted(record)}; expected 'frames' or 'video_bytes'")
    control = _window(record["condition"], idx, size) if "condition" in record else None
    caption = _text(record.get("caption", ""))
    if hflip and flip_of(seed, index, epoch):
        clip, caption = clip[:, :, ::-1], mirror_caption(caption)
        control = None if control is None else control[:, :, ::-1]
    out = {"pixels": clip.astype(np.float32) / 127.5 - 1.0,  # 255 / 127.5 is exactly 2
           "caption": caption, "videoid": _text(record.get("videoid", str(index)))}
    if control is not None:
        out["condition"] = control.astype(np.float32) / 255.0
    return out


def decode_record(record: dict, **kw: Any) -> tuple[np.ndarray, str, str]:
    """(pixels, caption, videoid) of `decode_clip` (same arguments)."""
    clip = decode_clip(record, **kw)
    return clip["pixels"], clip["caption"], clip["videoid"]


class TrainData:
    """Per-host training batches over a random-access source.

    One global order for every host count: each epoch shuffles all rows afresh and cuts them
    into global batches of `batch_per_host x process_count` (the remainder that does not fill
    one is dropped, `drop_remainder`); host `p` reads slice `p` of each global batch. So the
    global batch at a step is the same clips on 1 host or 8, and the hosts' rows are disjoint.
    A row that cannot be decoded, or is shorter than `frames`, is replaced by the next valid
    row (`row + 1`, `row + 2`, ... modulo the dataset), the same on every host count.
    """

    def __init__(self, source: Any, *, frames: int = 16, stride: int = 4, size: int = 256,
                 hflip: bool = True, seed: int = 0, batch_per_host: int = 4,
                 process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, max_frames: int | None = 64):
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        if not 0 <= pi < pc:
            raise DataError(f"process_index={pi}, process_count={pc}; expected 0 <= index < count")
        if min(frames, stride, batch_per_host, size) < 1 or seed < 0:
            raise DataError(f"frames={frames}, stride={stride}, batch_per_host={batch_per_host}, "
                            f"size={size}, seed={seed}; expected positive values and seed >= 0")
        n = len(source)
        global_batch = batch_per_host * pc
        if n == 0:
            raise DataError("the dataset has no rows; expected at least one")
        if drop_remainder and n < global_batch:
            raise DataError(f"the dataset has {n} rows; expected at least one global batch "
                            f"({batch_per_host} per host x {pc} hosts = {global_batch})")
        self.source, self.seed, self.hflip = source, seed, hflip
        self.frames, self.stride, self.size, self.max_frames = frames, stride, size, max_frames
        self.batch_per_host, self.drop_remainder = batch_per_host, drop_remainder
        self.process_index, self.process_count = pi, pc
        self.replaced = 0  # replacement events, over every batch built by this object
        self._bad: dict[int, str] = {}
        self._lock = threading.Lock()
        # grain's shuffle seeds epoch e with (seed + e); a derived seed keeps run seed s+1 from
        # replaying run seed s's orders shifted by one epoch.
        shuffle_seed = int(np.random.default_rng((seed, 0x5EED)).integers(2**31))
        # batch before repeat: batches never straddle epochs, and repeat reseeds each epoch.
        self._global = grain.MapDataset.range(n).shuffle(seed=shuffle_seed).batch(
            global_batch, drop_remainder=drop_remainder).repeat()
        self.dataset = self._global.map_with_index(
            lambda step, rows: self._load_batch(step, self._host_slice(rows)))

    @property
    def epoch_size(self) -> int:
        """Rows in the source."""
        return len(self.source)

    @property
    def steps_per_epoch(self) -> int:
        g = self.batch_per_host * self.process_count
        return len(self.source) // g if self.drop_remainder else -(-len(self.source) // g)

    @property
    def rows_used(self) -> int:
        """Rows all hosts together read per epoch; `epoch_size - rows_used` are dropped."""
        return min(len(self.source),
                   self.steps_per_epoch * self.batch_per_host * self.process_count)

    def indices(self, step: int) -> np.ndarray:
        """Source rows scheduled for this host's batch at `step` (before any replacement)."""
        return self._host_slice(self._global[step])

    def _host_slice(self, rows: Any) -> np.ndarray:
        b, p = self.batch_per_host, self.process_index
        return np.asarray(rows, np.int64)[p * b:(p + 1) * b]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """`pixels` float32 (B, F, size, size, 3) in [-1, 1]; `caption`, `videoid` (object
        arrays of str); `index` int64 (B,): the rows actually used; `condition` float32 (B, F,
        size, size, 3) in [0, 1] when the rows store control images."""
        return self.dataset[step]

    def iterate(self, start_step: int = 0, threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches from `start_step` on; `threads` > 0 prefetches that many batches in parallel
        (grain), in the same order."""
        if threads <= 0:
            step = start_step
            while True:
                yield self.batch(step)
                step += 1
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        yield from self.dataset.slice(slice(start_step, None)).to_iter_dataset(options)

    def _load_batch(self, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        epoch = step // self.steps_per_epoch
        loaded = [self._load_row(epoch, int(r)) for r in rows]
        batch = {
            "pixels": np.stack([x["pixels"] for x in loaded]),
            "caption": np.array([x["caption"] for x in loaded], dtype=object),
            "videoid": np.array([x["videoid"] for x in loaded], dtype=object),
            "index": np.array([x["index"] for x in loaded], np.int64),
        }
        if all("condition" in x for x in loaded):
            batch["condition"] = np.stack([x["condition"] for x in loaded])
        return batch

    def _load_row(self, epoch: int, row: int) -> dict[str, Any]:
        n = len(self.source)
        for k in range(n):
            candidate = (row + k) % n
            if candidate not in self._bad:
                try:
                    clip = decode_clip(
                        self.source[candidate], index=candidate, frames=self.frames,
                        stride=self.stride, size=self.size, hflip=self.hflip, seed=self.seed,
                        epoch=epoch, max_frames=self.max_frames)
                # Any failure reading one row (decoder, record format) must not end a long run:
                # the row is marked bad, logged, and the next row is used; all deterministic.
                except Exception as e:
                    with self._lock:
                        self._bad[candidate] = f"{type(e).__name__}: {e}"
                    LOG.warning("row %d unreadable (%s); using the next valid row",
                                candidate, self._bad[candidate])
                    continue
                if k:
                    with self._lock:
                        self.replaced += 1
                    LOG.info("row %d replaced by row %d (replacements so far: %d)",
                             row, candidate, self.replaced)
                return {**clip, "index": candidate}
        raise DataError(f"no readable clip among the dataset's {n} rows; expected videos of at "
                        f"least {self.frames} frames")


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """Numeric per-host arrays (`pixels`) -> global jax Arrays laid out by `sharding` (its
    leading axis spans the hosts' batches); host-side fields (`caption`, `videoid`, `index`)
    stay numpy."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        numeric = isinstance(value, np.ndarray) and value.dtype.kind in "fiub"
        if numeric and key != "index":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = value
    return out
