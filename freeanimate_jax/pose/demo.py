"""A deterministic demo input: a figure that waves its right arm while stepping side to side,
plus a matching cartoon reference picture. No files or downloads needed."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from freeanimate_jax.pose.keypoints import KEYPOINT_NAMES

# Rest pose in units of min(H, W), relative to the canvas centre; +x is image right, +y down.
# The figure faces the viewer, so its right side is on the image's left.
_REST = {
    "nose": (0.0, -0.30), "neck": (0.0, -0.20),
    "r_shoulder": (-0.10, -0.20), "r_elbow": (-0.20, -0.27), "r_wrist": (-0.20, -0.40),
    "l_shoulder": (0.10, -0.20), "l_elbow": (0.13, -0.06), "l_wrist": (0.15, 0.07),
    "r_hip": (-0.06, 0.06), "r_knee": (-0.07, 0.23), "r_ankle": (-0.08, 0.40),
    "l_hip": (0.06, 0.06), "l_knee": (0.07, 0.23), "l_ankle": (0.08, 0.40),
    "r_eye": (-0.03, -0.32), "l_eye": (0.03, -0.32), "r_ear": (-0.06, -0.30),
    "l_ear": (0.06, -0.30),
}  # fmt: skip
_FOREARM = 0.13
_SWAY = 0.06  # side-step amplitude
_LIFT = 0.03  # how high the trailing foot lifts


def _pose_units(t: float) -> dict[str, tuple[float, float]]:
    """Keypoints at phase ``t`` (radians; one side-step cycle per 2*pi, two waves)."""
    sway = _SWAY * math.sin(t)
    bob = 0.005 * (1.0 - math.cos(2.0 * t))  # the body dips slightly mid-step
    pts = {k: (x + sway, y + bob) for k, (x, y) in _REST.items()}
    # The forearm swings about the elbow: the wave.
    theta = -0.2 + 0.5 * math.sin(2.0 * t)
    ex, ey = pts["r_elbow"]
    pts["r_wrist"] = (ex + _FOREARM * math.sin(theta), ey - _FOREARM * math.cos(theta))
    # Legs trail the hips; a squared lift keeps the foot's path smooth at touch-down.
    for side, sign in (("r", -1.0), ("l", 1.0)):
        lift = _LIFT * max(0.0, sign * math.sin(t)) ** 2
        kx, ky = _REST[f"{side}_knee"]
        ax, ay = _REST[f"{side}_ankle"]
        pts[f"{side}_knee"] = (kx + 0.8 * sway, ky - 0.5 * lift)
        pts[f"{side}_ankle"] = (ax + 0.5 * sway, ay - lift)
    return pts


def demo_keypoints(frames: int = 16, canvas_hw: tuple[int, int] = (512, 512)) -> np.ndarray:
    """(F, 18, 3) float64 pixel keypoints (confidence 1) of one smooth, looping motion cycle."""
    h, w = canvas_hw
    s = float(min(h, w))
    out = np.ones((frames, len(KEYPOINT_NAMES), 3), dtype=np.float64)
    for f in range(frames):
        pts = _pose_units(2.0 * math.pi * f / frames)
        for k, name in enumerate(KEYPOINT_NAMES):
            x, y = pts[name]
            out[f, k, :2] = (w / 2.0 + s * x, h / 2.0 + s * y)
    return out


def demo_reference(size_hw: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A cartoon person (skin head, red torso, orange arms, blue legs) in frame 0's pose on a
    light background, (H, W, 3) uint8. Drawn 4x larger and downsampled for smooth edges."""
    scale = 4
    h, w = size_hw[0] * scale, size_hw[1] * scale
    kp = demo_keypoints(1, (h, w))[0]
    p = {name: (float(kp[k, 0]), float(kp[k, 1])) for k, name in enumerate(KEYPOINT_NAMES)}
    s = float(min(h, w))
    img = Image.new("RGB", (w, h), (238, 232, 220))
    draw = ImageDraw.Draw(img)

    def limb(names: tuple[str, ...], color: tuple[int, int, int], width: float) -> None:
        pts = [p[n] for n in names]
        draw.line(pts, fill=color, width=max(1, round(width * s)), joint="curve")
        r = width * s / 2
        for x, y in pts:  # round caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)

    legs, arms, skin = (40, 60, 150), (235, 150, 40), (240, 200, 170)
    limb(("r_hip", "r_knee", "r_ankle"), legs, 0.06)
    limb(("l_hip", "l_knee", "l_ankle"), legs, 0.06)
    limb(("neck", "nose"), skin, 0.05)
    draw.polygon([p["r_shoulder"], p["l_shoulder"], p["l_hip"], p["r_hip"]], fill=(200, 50, 50))
    limb(("r_shoulder", "r_elbow", "r_wrist"), arms, 0.045)
    limb(("l_shoulder", "l_elbow", "l_wrist"), arms, 0.045)
    hx = (p["r_ear"][0] + p["l_ear"][0]) / 2
    hy = p["r_eye"][1] + 0.01 * s
    r = 0.075 * s
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=skin)
    small = img.resize((size_hw[1], size_hw[0]), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8).copy()
