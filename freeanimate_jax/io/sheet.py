"""Contact sheet: labelled columns (reference | pose | preview | result) of sampled frames."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from freeanimate_jax.io.images import letterbox
from freeanimate_jax.io.video import to_uint8

LABEL_H = 14  # label band height, px
SEP = 2  # separator width, px
BACKGROUND = (24, 24, 24)
SEPARATOR = (96, 96, 96)
TEXT = (235, 235, 235)


def sample_indices(num_frames: int, rows: int) -> np.ndarray:
    """``rows`` evenly spaced frame indices from first to last (fewer if there are fewer)."""
    rows = max(1, min(rows, num_frames))
    return np.round(np.linspace(0, num_frames - 1, rows)).astype(int)


def cell_origin(row: int, col: int, cell_hw: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel (y, x) of cell (row, col) in a sheet with cells of ``cell_hw``."""
    return LABEL_H + SEP + row * (cell_hw[0] + SEP), col * (cell_hw[1] + SEP)


def contact_sheet(
    columns: dict[str, np.ndarray],
    rows: int = 4,
    *,
    cell_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Lay out ``rows`` sampled frames per column under a text label; returns (H, W, 3) uint8.

    Each column is (F, H, W, 3) or a single (H, W, 3) image repeated on every row; uint8 or
    float in [0, 1]. Rows sample the longest column evenly; shorter columns are sampled at the
    same relative time. Cells default to the largest frame size; smaller frames are letterboxed.
    """
    if not columns:
        raise ValueError("contact_sheet needs at least one column")
    cols = {name: _as_frames(name, v) for name, v in columns.items()}
    if cell_hw is None:
        cell_hw = (max(v.shape[1] for v in cols.values()), max(v.shape[2] for v in cols.values()))
    ch, cw = int(cell_hw[0]), int(cell_hw[1])
    longest = max(v.shape[0] for v in cols.values())
    times = sample_indices(longest, rows) / max(1, longest - 1)
    n_rows, n_cols = len(times), len(cols)

    height = LABEL_H + SEP + n_rows * ch + (n_rows - 1) * SEP
    width = n_cols * cw + (n_cols - 1) * SEP
    sheet = np.empty((height, width, 3), dtype=np.uint8)
    sheet[:] = SEPARATOR
    sheet[:LABEL_H] = BACKGROUND

    for c, frames in enumerate(cols.values()):
        for r, t in enumerate(times):
            frame = frames[int(round(t * (frames.shape[0] - 1)))]
            if frame.shape[:2] != (ch, cw):
                frame = letterbox(frame, (ch, cw))[0]
            y, x = cell_origin(r, c, (ch, cw))
            sheet[y : y + ch, x : x + cw] = frame

    image = Image.fromarray(sheet)
    font = ImageFont.load_default()
    for c, name in enumerate(cols):
        x = cell_origin(0, c, (ch, cw))[1]
        # Clip each label to its column so long names do not run into the next one.
        label = Image.new("RGB", (cw, LABEL_H), BACKGROUND)
        ImageDraw.Draw(label).text((3, 1), name, fill=TEXT, font=font)
        image.paste(label, (x, 0))
    return np.asarray(image).copy()


def _as_frames(name: str, value: np.ndarray) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(
            f"column {name!r} has shape {arr.shape}; expected (F, H, W, 3) or (H, W, 3)"
        )
    return to_uint8(arr)
