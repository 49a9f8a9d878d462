"""Training data: synthetic clips, the WebVid-folder tfds builder (ArrayRecord, offline), PyAV
decoding and the grain pipeline (one global order sliced per host, exact resume, deterministic
replacement)."""

import logging
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from freeanimate_jax.data import DataError
from freeanimate_jax.data.builder import WebVidFolder, make_config, open_source, prepare
from freeanimate_jax.data.pipeline import (
    TrainData,
    clip_window,
    decode_record,
    flip_of,
    mirror_caption,
    to_global,
)
from freeanimate_jax.data.synthetic import PALETTE, SyntheticSource, moving_shape
from freeanimate_jax.data.video import decode_video, write_mp4

CORRUPT = "vid07"
CLIP = dict(frames=4, stride=4, size=32)


def _centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centre of the pixels that differ from the (always background) top-left pixel."""
    ys, xs = np.nonzero(np.any(frame != frame[0, 0], axis=-1))
    return np.array([xs.mean(), ys.mean()])


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "; expected" in message, message
    return message


def _video(i: int) -> np.ndarray:
    return moving_shape(i, 20, 64)[0][:, 8:56]  # 20 frames of 48x64: not square, resized


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[1:]}")


@pytest.fixture(scope="module")
def webvid(tmp_path_factory):
    """A 10-row WebVid folder (half the videos under page_dir, vid07 garbage bytes), prepared
    with the network blocked, as frames (size 32) and as raw bytes."""
    root = tmp_path_factory.mktemp("webvid")
    lines = ["videoid,name,page_dir"]
    for i in range(10):
        vid, page = f"vid{i:02d}", f"page{i % 3}"
        lines.append(f"{vid},clip number {i},{page}")
        path = root / f"{vid}.mp4" if i % 2 else root / page / f"{vid}.mp4"
        path.parent.mkdir(exist_ok=True)
        if vid == CORRUPT:
            path.write_bytes(b"this is not an mp4 " * 40)
        else:
            write_mp4(path, _video(i))
    (root / "results.csv").write_text("\n".join(lines) + "\n")

    data_dir = tmp_path_factory.mktemp("tfds")
    logger, handler = logging.getLogger("freeanimate_jax.data"), _Collect()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(socket.socket, "connect", _no_network)
            frames = prepare(data_dir, "frames", manual_dir=root, size=32)
            raw = prepare(data_dir, "bytes", manual_dir=root, size=32)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return SimpleNamespace(root=root, data_dir=data_dir, frames=frames, raw=raw,
                           log=handler.messages)


def test_moving_shape_is_pure_and_moves_as_captioned():
    directions = set()
    for i in range(24):
        video, caption = moving_shape(i, 8, 32, seed=3)
        again, caption_again = moving_shape(i, 8, 32, seed=3)
        assert np.array_equal(video, again) and caption == caption_again
        assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
        _, colour, shape, moving, direction = caption.split()
        assert moving == "moving" and shape in ("square", "circle")
        assert np.any(np.all(video[0] == PALETTE[colour], axis=-1))  # the colour it names
        dx, dy = _centroid(video[-1]) - _centroid(video[0])
        # 7 frame steps at >= 1 px/frame (at most 3 px/frame fit in 32 px): >= 7 px.
        expect = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}[direction]
        assert expect and min(abs(dx), abs(dy)) < 0.5, (caption, dx, dy)
        directions.add(direction)
    assert directions == {"left", "right", "up", "down"}
    assert not np.array_equal(moving_shape(0, 8, 32, seed=4)[0], moving_shape(0, 8, 32)[0])
    record = SyntheticSource(3, 8, 32, seed=3)[2]
    assert record["caption"] == moving_shape(2, 8, 32, seed=3)[1]


def test_write_and_decode_video(tmp_path):
    video = _video(0)
    path = write_mp4(tmp_path / "a.mp4", video)
    decoded = decode_video(path)
    assert decoded.shape == (20, 48, 64, 3) and decoded.dtype == np.uint8
    # Lossy H.264 on flat colours with sharp edges: small mean error.
    assert np.abs(decoded.astype(int) - video).mean() < 4
    assert np.array_equal(decode_video(path.read_bytes(), max_frames=5), decoded[:5])
    for bad in (b"garbage" * 30, tmp_path / "missing.mp4"):
        with pytest.raises(DataError) as e:
            decode_video(bad)
        _one_line(e)


def test_frames_builder_skips_the_corrupt_video_and_counts_it(webvid):
    source = open_source(webvid.data_dir, "frames", size=32)
    assert len(source) == 9
    assert [s["videoid"] for s in webvid.frames.skipped] == [CORRUPT]
    assert "cannot decode" in webvid.frames.skipped[0]["reason"]
    assert sum(f"skipped video {CORRUPT}" in m for m in webvid.log) == 1
    assert any("frames_32px_64f" in m and "9 videos stored, 1 skipped" in m for m in webvid.log)
    # The count survives a fresh builder (stored in the dataset's metadata).
    fresh = WebVidFolder(data_dir=str(webvid.data_dir), config=make_config("frames", 32))
    assert len(fresh.skipped) == 1
    records = [source[i] for i in range(len(source))]
    assert sorted(r["videoid"].decode() for r in records) == [
        f"vid{i:02d}" for i in range(10) if f"vid{i:02d}" != CORRUPT]
    for r in records:
        i = int(r["videoid"][3:])
        assert r["caption"].decode() == f"clip number {i}"
        assert len(r["frames"]) == 20 and r["frames"][0].shape == (32, 32, 3)


def test_frames_and_bytes_give_the_same_clip(webvid):
    frames_src = open_source(webvid.data_dir, "frames", 32)
    bytes_src = open_source(webvid.data_dir, "bytes")
    by_id = {bytes_src[i]["videoid"]: bytes_src[i] for i in range(len(bytes_src))}
    diffs = []
    for i in range(len(frames_src)):
        rec = frames_src[i]
        a = decode_record(rec, index=i, seed=1, **CLIP)
        b = decode_record(by_id[rec["videoid"]], index=i, seed=1, **CLIP)
        assert a[1:] == b[1:]
        diffs.append(np.abs(a[0] - b[0]).mean())
    # Same decoded frames and resize, so only the stored JPEG (quality 95) differs: measured
    # 0.002-0.016 per clip (about 2 grey levels at most) on these flat shapes with sharp edges.
    # 0.03 is ~2x that; another window or a flip of the same clips measured 0.016-0.29.
    assert max(diffs) < 0.03, diffs


def test_bytes_kept_as_is_and_undecodable_replaced_by_next_row(webvid, caplog):
    source = open_source(webvid.data_dir, "bytes")
    assert len(source) == 10 and webvid.raw.skipped == []  # bytes: only unreadable files skip
    stored = {source[i]["videoid"].decode(): source[i]["video_bytes"] for i in range(10)}
    assert stored[CORRUPT] == (webvid.root / f"{CORRUPT}.mp4").read_bytes()
    assert stored["vid00"] == (webvid.root / "page0" / "vid00.mp4").read_bytes()
    bad = next(i for i in range(10) if source[i]["videoid"].decode() == CORRUPT)
    caplog.set_level(logging.INFO, logger="freeanimate_jax.data")
    data = TrainData(source, batch_per_host=2, process_count=1, process_index=0, **CLIP)
    step = next(s for s in range(data.steps_per_epoch) if bad in data.indices(s))
    first = data.batch(step)
    assert data.replaced == 1 and bad not in first["index"]
    assert any(f"row {bad} unreadable" in m for m in caplog.messages)
    assert any(f"row {bad} replaced by row {(bad + 1) % 10}" in m for m in caplog.messages)
    expected = np.where(data.indices(step) == bad, (bad + 1) % 10, data.indices(step))
    assert np.array_equal(first["index"], expected)
    second = TrainData(source, batch_per_host=2, process_count=1, process_index=0, **CLIP)
    for other in (data.batch(step), second.batch(step)):
        assert np.array_equal(other["pixels"], first["pixels"])
        assert list(other["caption"]) == list(first["caption"])
    assert data.replaced == 2 and second.replaced == 1
    # A clip shorter than `frames` is replaced the same way.
    short = [{"videoid": "a", "caption": "x", "frames": np.zeros((2, 32, 32, 3), np.uint8)},
             {"videoid": "b", "caption": "y", "frames": np.zeros((6, 32, 32, 3), np.uint8)}]
    tiny = TrainData(short, batch_per_host=2, process_count=1, process_index=0, **CLIP)
    assert list(tiny.batch(0)["videoid"]) == ["b", "b"] and tiny.replaced == 1


def test_prepare_and_open_errors_are_one_line(tmp_path):
    data_dir = tmp_path / "out"
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {"does not exist": tmp_path / "nope", "no results.csv": folder}
    csvs = {"has no rows": "videoid,name,page_dir\n", "lacks column": "id,caption\n1,a\n",
            # the only listed video is garbage: found only by decoding, inside tfds
            "could be used": "videoid,name,page_dir\nv0,a,p\n"}
    for i, (what, content) in enumerate(csvs.items()):
        cases[what] = tmp_path / f"csv{i}"
        cases[what].mkdir()
        (cases[what] / "results.csv").write_text(content)
    (cases["could be used"] / "v0.mp4").write_bytes(b"\0" * 100)
    for what, manual_dir in cases.items():
        with pytest.raises(DataError) as e:
            prepare(data_dir, "frames", manual_dir=manual_dir, size=32)
        assert what in _one_line(e)
    with pytest.raises(DataError) as e:
        prepare(data_dir, "frames", size=32)
    assert "manual_dir" in _one_line(e)
    with pytest.raises(DataError) as e:
        prepare(data_dir, "latents")
    _one_line(e)
    with pytest.raises(DataError) as e:
        open_source(tmp_path / "empty", "frames", size=32)
    assert "no prepared dataset" in str(e.value) and "prepare-data" in str(e.value)


def test_synthetic_config_needs_no_files(tmp_path):
    prepare(tmp_path, "synthetic", size=32, num_videos=6, num_frames=8)
    source = open_source(tmp_path, "synthetic", size=32, num_videos=6, num_frames=8)
    assert len(source) == 6
    for i in range(6):
        rec = source[i]
        k = int(rec["videoid"].decode().split("-")[1])
        video, caption = moving_shape(k, 8, 32)
        assert rec["caption"].decode() == caption
        # JPEG (quality 95) of flat colours: only edge pixels move, by a few levels.
        assert np.abs(np.stack(rec["frames"]).astype(int) - video).mean() < 3


def test_two_hosts_see_disjoint_rows_and_count_the_dropped():
    source = SyntheticSource(11, 8, 16)
    hosts = [TrainData(source, batch_per_host=2, process_index=p, process_count=2, **CLIP)
             for p in (0, 1)]
    assert hosts[0].steps_per_epoch == hosts[1].steps_per_epoch == 2
    seen = []
    for data in hosts:
        rows = np.concatenate([data.indices(s) for s in range(data.steps_per_epoch)])
        assert len(set(rows.tolist())) == len(rows)
        seen.append(set(rows.tolist()))
    assert not seen[0] & seen[1]
    dropped = set(range(11)) - (seen[0] | seen[1])
    # 11 rows in global batches of 4: 2 steps per epoch, 3 rows left over.
    assert len(dropped) == hosts[0].epoch_size - hosts[0].rows_used == 3
    # The global batch is the same clips on one host (batch 4) as on two (2 + 2), so a run's
    # numbers do not depend on how many hosts feed it.
    single = TrainData(source, batch_per_host=4, process_index=0, process_count=1, **CLIP)
    for step in (0, 1, 2, 5):
        both = [data.batch(step) for data in hosts]
        one = single.batch(step)
        assert np.array_equal(np.concatenate([b["index"] for b in both]), one["index"])
        assert np.array_equal(np.concatenate([b["pixels"] for b in both]), one["pixels"])


def test_resume_is_exact_and_epochs_reshuffle():
    source = SyntheticSource(12, 8, 32)
    kwargs = dict(batch_per_host=3, process_index=0, process_count=1, seed=5, **CLIP)
    data, resumed = TrainData(source, **kwargs), TrainData(source, **kwargs)
    for step in (9, 0, 5):
        a, b = data.batch(step), resumed.batch(step)
        assert np.array_equal(a["pixels"], b["pixels"]) and np.array_equal(a["index"], b["index"])
        assert list(a["caption"]) == list(b["caption"])
        assert np.array_equal(a["index"], data.indices(step))
    spe = data.steps_per_epoch
    epochs = [np.concatenate([data.indices(e * spe + s) for s in range(spe)]) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1])
    other = TrainData(source, **{**kwargs, "seed": 6})
    assert not np.array_equal(other.indices(0), data.indices(0))
    streamed = data.iterate(start_step=5, threads=2)
    assert np.array_equal(next(streamed)["pixels"], data.batch(5)["pixels"])


def test_clip_window_and_flip_are_pure():
    starts = {int(clip_window(0, i, 64, 16, 4)[0]) for i in range(20)}
    assert len(starts) > 1 and max(starts) <= 64 - 61
    assert np.array_equal(clip_window(3, 7, 64, 16, 4), clip_window(3, 7, 64, 16, 4))
    assert np.array_equal(np.diff(clip_window(3, 7, 64, 16, 4)), np.full(15, 4))
    assert not np.array_equal(clip_window(3, 7, 64, 16, 4), clip_window(3, 7, 64, 16, 4, epoch=1))
    assert np.array_equal(clip_window(0, 0, 10, 4, 4), [0, 3, 6, 9])  # stride shrunk to fit
    with pytest.raises(DataError):
        clip_window(0, 0, 3, 4, 4)
    flips = [flip_of(0, i) for i in range(20)]
    assert flips == [flip_of(0, i) for i in range(20)] and set(flips) == {True, False}
    # A mirrored clip moves the other way, and its caption says so.
    i = next(i for i in range(40) if moving_shape(i, 8, 32)[1].endswith("left") and flip_of(0, i))
    record = SyntheticSource(40, 8, 32)[i]
    pixels, caption, _ = decode_record(record, index=i, frames=8, stride=1, size=32, hflip=True)
    plain, _, _ = decode_record(record, index=i, frames=8, stride=1, size=32, hflip=False)
    assert np.array_equal(pixels, plain[:, :, ::-1]) and caption.endswith("moving right")
    assert _centroid(pixels[-1])[0] > _centroid(pixels[0])[0] + 5
    assert mirror_caption("left to right, leftover") == "right to left, leftover"


def test_to_global_builds_the_global_batch():
    devices = jax.devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    data = TrainData(SyntheticSource(16, 4, 16), frames=2, stride=1, size=16,
                     batch_per_host=len(devices), process_index=0, process_count=1)
    local = data.batch(0)
    out = to_global(local, sharding)
    assert isinstance(out["pixels"], jax.Array) and out["pixels"].sharding == sharding
    assert out["pixels"].shape == (len(devices), 2, 16, 16, 3)
    assert np.array_equal(np.asarray(out["pixels"]), local["pixels"])
    assert out["caption"] is local["caption"] and out["index"] is local["index"]


def test_pipeline_does_not_import_tensorflow():
    code = "import sys, freeanimate_jax.data.pipeline; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "False"
