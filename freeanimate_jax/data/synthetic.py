"""Deterministic moving-shape videos whose captions name the motion, for tests and demos.

A motion module trained on them has something learnable: the caption says which way the shape
goes, and the pixels agree.
"""

from __future__ import annotations

import numpy as np

from freeanimate_jax.data.errors import DataError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle")
# (dx, dy) per unit of travel, in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Dark backgrounds, so every palette colour (white included) stands out.
BACKGROUNDS = ((0, 0, 0), (30, 30, 30), (15, 20, 45))


def moving_shape(index: int, frames: int, size: int, seed: int = 0, *,
                 condition: bool = False) -> tuple[np.ndarray, ...]:
    """Video (frames, size, size, 3) uint8 and its caption, e.g. "a red square moving left";
    with `condition`, also the shape's mask per frame (white on black, RGB uint8): a control
    image a ControlNet can learn to follow.

    A pure function of (seed, index). The shape moves at a constant speed (1-4 px/frame at 64 px,
    scaled with `size`, slower when needed to stay fully inside the frame); its centre is a float,
    so slow motion still shows as sub-pixel edge changes.
    """
    if frames < 1 or size < 8:
        raise DataError(f"moving_shape got frames={frames}, size={size}; expected >= 1 and >= 8")
    if index < 0 or seed < 0:
        raise DataError(f"moving_shape got index={index}, seed={seed}; expected both >= 0")
    rng = np.random.default_rng((seed, index))
    colour = list(PALETTE)[rng.integers(len(PALETTE))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    radius = max(2, size // 8)

    # Centre positions that keep the whole shape (and a 1 px margin) inside the frame.
    lo, hi = radius + 1.0, size - 2.0 - radius
    steps = max(frames - 1, 1)
    speed = min(rng.uniform(1.0, 4.0) * max(1.0, size / 64), (hi - lo) / steps)
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[direction]
    along = rng.uniform(lo + travel, hi) if dx + dy < 0 else rng.uniform(lo, hi - travel)
    across = rng.uniform(lo, hi)
    t = np.arange(frames, dtype=np.float64) * speed
    cx = along + dx * t if dx else np.full(frames, across)
    cy = along + dy * t if dy else np.full(frames, across)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ddx = xx[None] - cx[:, None, None]
    ddy = yy[None] - cy[:, None, None]
    if shape == "square":
        mask = (np.abs(ddx) <= radius) & (np.abs(ddy) <= radius)
    else:
        mask = ddx**2 + ddy**2 <= radius**2
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = np.asarray(background, np.uint8)
    video[mask] = np.asarray(PALETTE[colour], np.uint8)
    caption = f"a {colour} {shape} moving {direction}"
    if not condition:
        return video, caption
    control = np.zeros_like(video)
    control[mask] = 255
    return video, caption, control


class SyntheticSource:
    """In-memory random-access source of `moving_shape` records, shaped like a tfds data source
    row (`videoid`, `caption`, `frames`, `condition`: the shapes' masks), so `TrainData` runs
    without tensorflow-datasets."""

    def __init__(self, num_videos: int = 64, num_frames: int = 24, size: int = 256,
                 seed: int = 0):
        if num_videos < 1:
            raise DataError(f"synthetic source got num_videos={num_videos}; expected >= 1")
        self.num_videos, self.num_frames, self.size, self.seed = num_videos, num_frames, size, seed

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_videos:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_videos})")
        video, caption, control = moving_shape(int(index), self.num_frames, self.size,
                                               self.seed, condition=True)
        return {"videoid": f"synthetic-{index:06d}", "caption": caption, "frames": video,
                "condition": control}
