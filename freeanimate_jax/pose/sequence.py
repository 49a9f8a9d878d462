"""Load a driving pose sequence, from keypoints, skeleton images or a skeleton video, as frames
letterboxed to the model size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freeanimate_jax.io.images import InputError, letterbox, load_image
from freeanimate_jax.io.video import VIDEO_SUFFIXES, read_video
from freeanimate_jax.pose.keypoints import (
    DEFAULT_THRESHOLD,
    PoseError,
    natural_key,
    read_keypoints,
)
from freeanimate_jax.pose.render import render_sequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_poses(
    path: str | Path,
    size_hw: tuple[int, int],
    *,
    canvas_hw: tuple[int, int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """Pose frames (F, H, W, 3) uint8 at ``size_hw``, each letterboxed (aspect kept, black bars).

    ``path`` is a keypoint JSON file or folder (drawn at the source canvas size, ``canvas_hw``
    when the JSON has none, then scaled, as controlnet_aux does), a folder of skeleton images, a
    single skeleton image, or a skeleton video.
    """
    path = Path(path)
    if not path.exists():
        raise PoseError(f"{path}: no such file or folder; expected pose keypoints, images or video")
    try:
        frames = _load_frames(path, canvas_hw, threshold)
    except InputError as e:  # one error type for callers of the pose loader
        raise PoseError(str(e)) from None
    if not frames:
        raise PoseError(f"{path}: no pose frames; expected at least one")
    return np.stack([letterbox(f, size_hw, kind="pose")[0] for f in frames])


def _load_frames(
    path: Path, canvas_hw: tuple[int, int] | None, threshold: float
) -> list[np.ndarray]:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        jsons = [p for p in files if p.suffix.lower() == ".json"]
        images = sorted((p for p in files if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        if jsons and images:
            raise PoseError(f"{path}: folder mixes *.json and images; expected one kind of pose")
        if jsons:
            return list(_render(path, canvas_hw, threshold))
        if not images:
            raise PoseError(
                f"{path}: folder is empty of poses; expected *.json or "
                f"{'/'.join(IMAGE_SUFFIXES)} files"
            )
        # Transparent skeleton PNGs get black behind them, the ControlNet's background.
        return [load_image(p, background=(0, 0, 0)) for p in images]
    suffix = path.suffix.lower()
    if suffix == ".json":
        return list(_render(path, canvas_hw, threshold))
    if suffix in IMAGE_SUFFIXES:
        return [load_image(path, background=(0, 0, 0))]
    if suffix in VIDEO_SUFFIXES:
        return list(read_video(path)[0])
    raise PoseError(
        f"{path}: unknown pose file type {suffix!r}; expected .json, an image or a video"
    )


def _render(path: Path, canvas_hw: tuple[int, int] | None, threshold: float) -> np.ndarray:
    seq = read_keypoints(path, canvas_hw=canvas_hw, threshold=threshold)
    return render_sequence(seq, threshold=threshold)
