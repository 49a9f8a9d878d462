"""OpenPose-18 / DWPose keypoint JSON -> (F, P, 18, 3) arrays in source-canvas pixels.

Accepted layouts: a folder of per-frame ``*.json`` files (natural name order, so ``frame_10``
follows ``frame_9``), or one JSON file holding a list of frames or a single frame. A frame is
``{"people": [{"pose_keypoints_2d": [x0, y0, c0, ...]}], "canvas_width": W,
"canvas_height": H}``. The canvas size is optional; the caller's ``canvas_hw`` is the fallback.

Missing keypoints (confidence not above ``threshold``, (0, 0), negative or non-finite
coordinates) come out as (0, 0, 0), so downstream code only has to look at the confidence.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NUM_KEYPOINTS = 18
DEFAULT_THRESHOLD = 0.3  # controlnet_aux's DWPose keeps a keypoint when its score is > 0.3

# OpenPose-18 (COCO order as used by the openpose ControlNet).
KEYPOINT_NAMES = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip

# BODY_25 -> OpenPose-18: BODY_25 is OpenPose-18 with MidHip inserted at index 8 and six foot
# points appended (19..24). Dropping those is exact for the other 18, so we convert rather than
# refuse: the ControlNet never saw MidHip or feet anyway.
BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


class PoseError(ValueError):
    """A pose input that cannot be used; the message is one line naming the input."""


@dataclass(frozen=True)
class PoseSequence:
    """Keypoints (F, P, 18, 3) float64 as (x, y, confidence) in pixels of ``canvas_hw``.

    Frames with fewer people than P are padded with all-missing people (confidence 0).
    """

    keypoints: np.ndarray
    canvas_hw: tuple[int, int]

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    def person(self, index: int = 0) -> np.ndarray:
        """One person's track, (F, 18, 3)."""
        return self.keypoints[:, index]


def visible_mask(keypoints: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """True where a keypoint is drawable: confident, finite, not at (0, 0) or negative."""
    kp = np.asarray(keypoints, dtype=np.float64)
    x, y, c = kp[..., 0], kp[..., 1], kp[..., 2]
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(c)
        placed = (x >= 0) & (y >= 0) & ~((x == 0) & (y == 0))
        return finite & placed & (c > threshold)


def natural_key(path: Path) -> list[Any]:
    """Sort key so that ``f2.json`` < ``f10.json``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def read_keypoints(
    path: str | Path,
    *,
    canvas_hw: tuple[int, int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> PoseSequence:
    """Read a keypoint JSON file or folder into a :class:`PoseSequence`.

    Coordinates that are all <= 1.0 are taken as normalised (controlnet_aux's convention) and
    scaled by the canvas size. The canvas size in the JSON wins over ``canvas_hw``.
    """
    path = Path(path)
    if not path.exists():
        raise PoseError(f"{path}: no such file or folder; expected a keypoint JSON file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.json"), key=natural_key)
        if not files:
            raise PoseError(f"{path}: folder has no *.json files; expected per-frame keypoints")
        frames = [(f, 0, _load_json(f)) for f in files]
        for f, _, data in frames:
            if not isinstance(data, dict):
                raise PoseError(f"{f}: top level is {type(data).__name__}; expected one frame")
    else:
        data = _load_json(path)
        if isinstance(data, list):
            frames = [(path, i, d) for i, d in enumerate(data)]
        elif isinstance(data, dict):
            frames = [(path, 0, data)]
        else:
            raise PoseError(f"{path}: top level is {type(data).__name__}; expected a frame list")
    if not frames:
        raise PoseError(f"{path}: no frames; expected at least one pose frame")

    people = [_parse_frame(f, i, d) for f, i, d in frames]
    canvas = _canvas_size(frames, path, canvas_hw)
    count = max(1, max(len(p) for p in people))
    kp = np.zeros((len(people), count, NUM_KEYPOINTS, 3), dtype=np.float64)
    for i, persons in enumerate(people):
        for j, person in enumerate(persons):
            kp[i, j] = person

    vis = visible_mask(kp, threshold)
    if not vis.any():
        raise PoseError(f"{path}: no keypoint above confidence {threshold} in any frame")
    if np.all(kp[..., :2][vis] <= 1.0):
        # float64 multiply, the same arithmetic controlnet_aux's draw_bodypose does
        kp[..., 0] *= float(canvas[1])
        kp[..., 1] *= float(canvas[0])
    kp[~vis] = 0.0
    return PoseSequence(keypoints=kp, canvas_hw=canvas)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PoseError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno}); expected OpenPose keypoint JSON"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PoseError(f"{path}: cannot read ({type(e).__name__}); expected a JSON file") from None


def _parse_frame(path: Path, index: int, frame: Any) -> list[np.ndarray]:
    where = f"{path}: frame {index}"
    if not isinstance(frame, dict) or "people" not in frame:
        raise PoseError(
            f"{where}: no 'people' key; expected "
            "{'people': [{'pose_keypoints_2d': [x, y, c, ...]}]}"
        )
    people = frame["people"]
    if not isinstance(people, list):
        raise PoseError(f"{where}: 'people' is {type(people).__name__}; expected a list")
    out = []
    for j, person in enumerate(people):
        flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if flat is None or (isinstance(flat, list) and not flat):
            continue  # an empty body entry (hands/face only) is no body to draw
        try:
            values = np.asarray(flat, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise PoseError(
                f"{where}: person {j}: pose_keypoints_2d is not a list of numbers; "
                "expected [x, y, c, ...]"
            ) from None
        if values.size == 3 * NUM_KEYPOINTS:
            out.append(values.reshape(NUM_KEYPOINTS, 3))
        elif values.size == 3 * 25:
            out.append(values.reshape(25, 3)[list(BODY25_TO_18)])
        else:
            raise PoseError(
                f"{where}: person {j}: pose_keypoints_2d has {values.size} numbers; "
                "expected 54 (18 x,y,c triples, OpenPose-18) or 75 (BODY_25)"
            )
    return out


def _canvas_size(
    frames: list[tuple[Path, int, Any]], path: Path, fallback: tuple[int, int] | None
) -> tuple[int, int]:
    sizes = set()
    for f, i, d in frames:
        w, h = d.get("canvas_width"), d.get("canvas_height")
        if w is None and h is None:
            continue
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 1 for v in (w, h)):
            raise PoseError(
                f"{f}: frame {i}: canvas_width/canvas_height = {w!r}/{h!r}; "
                "expected two positive numbers"
            )
        sizes.add((int(h), int(w)))
    if len(sizes) > 1:
        raise PoseError(f"{path}: frames disagree on canvas size {sorted(sizes)}; expected one")
    if sizes:
        return sizes.pop()
    if fallback is None:
        raise PoseError(f"{path}: no canvas_width/canvas_height in the JSON; pass canvas_hw")
    return (int(fallback[0]), int(fallback[1]))
