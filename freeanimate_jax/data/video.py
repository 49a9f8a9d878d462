"""Video decoding (PyAV), the training-size resize, and a small mp4 writer for tests."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from freeanimate_jax.data.errors import DataError


def _describe(source: str | Path | bytes) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def decode_video(source: str | Path | bytes, max_frames: int | None = None) -> np.ndarray:
    """Decode the first video stream of a file or of in-memory bytes to uint8 (F, H, W, 3) RGB.

    Decoding stops after `max_frames` frames. Any failure (no such file, not a video, no video
    stream, a broken stream, zero frames) is a DataError, so callers can skip the video.
    """
    import av  # imported here: decoding is only needed when preparing or reading raw bytes

    what = _describe(source)
    if max_frames is not None and max_frames < 1:
        raise DataError(f"max_frames={max_frames}; expected None or >= 1")
    frames: list[np.ndarray] = []
    target = io.BytesIO(bytes(source)) if not isinstance(source, (str, Path)) else str(source)
    try:
        with av.open(target, mode="r") as container:
            if not container.streams.video:
                raise DataError(f"{what} has no video stream; expected a video file")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except DataError:
        raise
    except Exception as e:  # FFmpeg reports bad input through many error types
        reason = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"cannot decode {what} ({type(e).__name__}: {reason}); "
                        "expected a readable video (e.g. H.264 mp4)") from e
    if not frames:
        raise DataError(f"{what} decoded to zero frames; expected at least one frame")
    return np.stack(frames)


def resize_short_side_and_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize (F, H, W, 3) uint8 so the short side is `size`, then centre-crop to size x size.

    Area interpolation when shrinking (no aliasing), bicubic when enlarging; OpenCV's resize is
    deterministic, so the same input always gives the same clip.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(f"frames have shape {frames.shape} and dtype {frames.dtype}; "
                        "expected uint8 (F, H, W, 3)")
    if size < 1:
        raise DataError(f"size={size}; expected >= 1")
    _, h, w, _ = frames.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        frames = np.stack([cv2.resize(f, (nw, nh), interpolation=interp) for f in frames])
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8) -> Path:
    """Write uint8 (F, H, W, 3) RGB frames as an mp4 (H.264 yuv420p, or MPEG-4 part 2 where
    this FFmpeg build has no libx264). yuv420p needs even sides."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(f"frames have shape {frames.shape} and dtype {frames.dtype}; "
                        "expected uint8 (F, H, W, 3)")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise DataError(f"frames are {h}x{w}; expected even height and width (yuv420p)")
    path = Path(path)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(str(fps)).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path
