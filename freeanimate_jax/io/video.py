"""Video / still / JSON writers that never leave a partial file (`io/atomic.py`), and a video
reader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageSequence

from freeanimate_jax.io.atomic import staged, write_files_atomic  # noqa: F401  (re-exported)
from freeanimate_jax.io.images import InputError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif", ".npz")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """uint8 passes through; floats in [0, 1] are rounded to uint8. NaN/inf -> InputError."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise InputError(f"frames have dtype {frames.dtype}; expected uint8 or float in [0, 1]")
    if not np.all(np.isfinite(frames)):
        raise InputError("frames contain NaN or inf; expected finite values in [0, 1]")
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write (F, H, W, 3) uint8 or float [0, 1] frames; the format follows the suffix.

    ``.mp4``: H.264 yuv420p. That chroma format needs even sides, so an odd width/height gets one
    edge-replicated column/row (read back 1 px larger); model sizes are multiples of 8 anyway.
    ``.gif``: Pillow, looping; palette-quantised, and Pillow merges identical consecutive
    frames into one longer frame. ``.npz``: float32 frames in [0, 1] (``frames``) and ``fps``,
    lossless.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InputError(f"{path}: frames have shape {frames.shape}; expected (F>0, H, W, 3)")
    if not (np.isfinite(fps) and fps > 0):
        raise InputError(f"{path}: fps is {fps}; expected a positive number")
    writer = {".mp4": _write_mp4, ".gif": _write_gif, ".npz": _write_npz}.get(suffix)
    if writer is None:
        raise InputError(f"{path}: unknown video suffix {suffix!r}; expected .mp4, .gif or .npz")
    data = _to_float32(frames) if suffix == ".npz" else to_uint8(frames)
    # The MP4 writer starts ffmpeg; JAX warns about any fork once its threads run, but this one
    # is a fork+exec of an external program, which never touches the parent's locks.
    with staged(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        writer(tmp, data, float(fps))


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a video (anything ffmpeg decodes), GIF or our ``.npz`` as ((F, H, W, 3) uint8, fps)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected a video")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path) as z:
                frames, fps = to_uint8(z["frames"]), float(z["fps"])
        elif suffix == ".gif":
            frames, fps = _read_gif(path)
        else:
            frames, fps = _read_ffmpeg(path)
    except InputError:
        raise
    except Exception as e:  # decoders raise anything from OSError to IndexError on bad data
        raise InputError(
            f"{path}: corrupt or unreadable video ({type(e).__name__}); expected a "
            "playable mp4/webm/gif/npz"
        ) from None
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise InputError(f"{path}: no frames decoded; expected a non-empty video")
    return frames, fps


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON-encode ``obj`` (indented, UTF-8) and put it at ``path`` atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # fails before any file exists
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_png_atomic(path: str | Path, img: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 or float [0, 1] image as PNG atomically."""
    data = to_uint8(np.asarray(img))
    with staged(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")


def _to_float32(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    to_uint8(frames)  # same dtype / NaN validation as the other formats
    return frames.astype(np.float32)


def _write_npz(tmp: Path, frames: np.ndarray, fps: float) -> None:
    with open(tmp, "wb") as f:  # a file object stops numpy from appending another ".npz"
        np.savez(f, frames=frames, fps=np.float64(fps))


def _write_mp4(tmp: Path, frames: np.ndarray, fps: float) -> None:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    # macro_block_size=1: imageio would otherwise silently rescale to a multiple of 16.
    writer = imageio.get_writer(
        tmp,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        quality=8,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_gif(tmp: Path, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        loop=0,
        duration=max(20, round(1000.0 / fps)),
        disposal=1,
        optimize=False,
    )


def _read_gif(path: Path) -> tuple[np.ndarray, float]:
    with Image.open(path) as im:
        durations, frames = [], []
        for frame in ImageSequence.Iterator(im):
            durations.append(frame.info.get("duration", 100) or 100)
            frames.append(np.asarray(frame.convert("RGB")))
    return np.stack(frames), 1000.0 / float(np.median(durations))


def _read_ffmpeg(path: Path) -> tuple[np.ndarray, float]:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        fps = float(reader.get_meta_data().get("fps", 0.0)) or 25.0
        frames = [np.asarray(f)[..., :3] for f in reader]
    finally:
        reader.close()
    if not frames:
        raise InputError(f"{path}: no frames decoded; expected a non-empty video")
    return np.stack(frames).astype(np.uint8), fps
