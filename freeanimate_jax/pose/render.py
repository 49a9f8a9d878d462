"""Draw OpenPose-18 skeletons the way the openpose ControlNet saw them in training.

Reproduces controlnet_aux's ``open_pose/util.py:draw_bodypose`` pixel for pixel (same OpenCV
calls, same float64 arithmetic, same int truncations): limbs are filled ellipses of half-width
``STICKWIDTH`` in 0.6 x the limb colour, joints are filled circles of radius 4 in full colour,
on black, RGB. Several people are drawn one after the other (limbs then joints per person), as
controlnet_aux's ``draw_poses`` does; its DWPose variant instead draws every person's limbs
before any joint, which differs only where two people overlap.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from freeanimate_jax.pose.keypoints import DEFAULT_THRESHOLD, PoseSequence, visible_mask

STICKWIDTH = 4
JOINT_RADIUS = 4
LIMB_OPACITY = 0.6

# 0-based keypoint pairs; index i is drawn in COLORS[i]. These are controlnet_aux's 1-based
# limbSeq minus one. OpenPose's full table has two more (shoulder-ear) pairs that are never drawn.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

# RGB; keypoint k's joint is COLORS[k], limb i is COLORS[i] scaled by LIMB_OPACITY.
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


def limb_color(index: int) -> tuple[int, int, int]:
    """The drawn colour of limb ``index`` (truncated like ``int(float(c) * 0.6)``)."""
    r, g, b = (int(float(c) * LIMB_OPACITY) for c in COLORS[index])
    return (r, g, b)


def render_pose(
    keypoints: np.ndarray,
    canvas_hw: tuple[int, int],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """Draw (18, 3) or (P, 18, 3) pixel keypoints on a black (H, W, 3) uint8 canvas."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim == 2:
        kp = kp[None]
    if kp.ndim != 3 or kp.shape[1:] != (18, 3):
        raise ValueError(f"keypoints have shape {kp.shape}; expected (18, 3) or (P, 18, 3)")
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    vis = visible_mask(kp, threshold)
    for person, seen in zip(kp, vis, strict=True):
        _draw_person(canvas, person, seen)
    return canvas


def render_sequence(
    frames: PoseSequence | np.ndarray,
    canvas_hw: tuple[int, int] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """Render (F, 18, 3) / (F, P, 18, 3) keypoints, or a PoseSequence, to (F, H, W, 3) uint8."""
    if isinstance(frames, PoseSequence):
        canvas_hw = canvas_hw or frames.canvas_hw
        frames = frames.keypoints
    if canvas_hw is None:
        raise ValueError("render_sequence needs canvas_hw for a bare keypoint array")
    out = [render_pose(f, canvas_hw, threshold=threshold) for f in np.asarray(frames)]
    if not out:
        return np.zeros((0, int(canvas_hw[0]), int(canvas_hw[1]), 3), dtype=np.uint8)
    return np.stack(out)


def _draw_person(canvas: np.ndarray, kp: np.ndarray, seen: np.ndarray) -> None:
    for i, (a, b) in enumerate(LIMBS):
        if not (seen[a] and seen[b]):
            continue
        xs = np.array([kp[a, 0], kp[b, 0]])
        ys = np.array([kp[a, 1], kp[b, 1]])
        # np.mean, ** 0.5 and int() truncation exactly as the reference computes them, so the
        # ellipse lands on the same pixels; rounding instead would shift limbs by one pixel.
        mx, my = np.mean(xs), np.mean(ys)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly(
            (int(mx), int(my)), (int(length / 2), STICKWIDTH), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, polygon, limb_color(i))
    for k in range(len(COLORS)):
        if seen[k]:
            centre = (int(kp[k, 0]), int(kp[k, 1]))
            cv2.circle(canvas, centre, JOINT_RADIUS, COLORS[k], thickness=-1)
