"""Sliding context windows for videos longer than a motion module's position table.

FreeNoise-style: windows of `length` frames starting every `stride` frames (the last window is
pulled back to end at the last frame), each window's noise prediction blended into the frames
it covers with weights that fall off towards the window's edges (so seams fade), normalised to
sum to 1 per frame; the initial noise of later frames reuses the first window's noise, shuffled
locally, so distant windows start from correlated noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Windows:
    index: np.ndarray  # (n_windows, length) frame indices
    weight: np.ndarray  # (n_windows, length) blending weights; per frame they sum to 1

    @property
    def count(self) -> int:
        return self.index.shape[0]


def make_windows(frames: int, length: int | None, stride: int = 4) -> Windows:
    """Windows covering `frames`; a single window (weight 1) when they fit in one."""
    if length is None or frames <= length:
        return Windows(np.arange(frames)[None], np.ones((1, frames), np.float32))
    if stride < 1 or stride > length:
        raise ValueError(f"context stride {stride} must be in [1, {length}]")
    starts = list(range(0, frames - length + 1, stride))
    if starts[-1] != frames - length:
        starts.append(frames - length)
    index = np.stack([np.arange(s, s + length) for s in starts])
    # Pyramid weights: 1 at the edges rising to length/2 in the middle, so each frame leans on
    # the windows where it sits most centrally.
    ramp = np.minimum(np.arange(1, length + 1), np.arange(length, 0, -1)).astype(np.float64)
    raw = np.tile(ramp, (len(starts), 1))
    total = np.zeros(frames)
    np.add.at(total, index, raw)
    return Windows(index, (raw / total[index]).astype(np.float32))


def blend(per_window: Array, windows: Windows, frames: int) -> Array:
    """Weighted sum of per-window predictions (n_windows, length, ...) into (frames, ...)."""
    w = jnp.asarray(windows.weight).reshape(windows.weight.shape + (1,) * (per_window.ndim - 2))
    out = jnp.zeros((frames,) + per_window.shape[2:], per_window.dtype)
    return out.at[jnp.asarray(windows.index.reshape(-1))].add(
        (per_window * w.astype(per_window.dtype)).reshape((-1,) + per_window.shape[2:]))


def freenoise_order(frames: int, length: int | None, stride: int, seed: int) -> np.ndarray:
    """Which base-noise frame each frame reuses: identity for the first window; later blocks of
    `length` frames reuse it shuffled within groups of `stride` (FreeNoise's local shuffle)."""
    if length is None or frames <= length:
        return np.arange(frames)
    rng = np.random.default_rng(seed)
    order = list(range(length))
    while len(order) < frames:
        block = np.arange(length)
        for g in range(0, length, stride):
            rng.shuffle(block[g:g + stride])
        order.extend(block.tolist())
    return np.asarray(order[:frames])
