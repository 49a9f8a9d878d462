"""Procedural motions of the toy figure as OpenPose-18 keypoint sequences.

A pose is a small skeleton state (where the hips are, the torso's lean, how far the figure has
turned, and each limb's angles); forward kinematics places the 18 keypoints with fixed bone
lengths, so limbs never stretch. A motion is a periodic function of the phase; a clip draws its
speed, phase, amplitude, position and size from a seed. Keypoints come in canvas units (x, y in
[0, 1]), confidence 1.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from freeanimate_jax.pose.keypoints import KEYPOINT_NAMES

# Bone lengths in units of the figure's height (head top to feet, about 0.8 of the canvas).
TORSO, _NECK_HEAD, _UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.32, 0.12, 0.16, 0.15, 0.21, 0.21
_SHOULDER, _HIP = 0.12, 0.075  # half widths, facing the viewer
_EYE, _EAR = (0.035, 0.025), 0.07


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """Angles in radians: 0 points a limb straight down, pi/2 sideways away from the body, pi
    straight up; the second angle of a limb bends its lower part relative to the upper.
    `turn`: 1 facing the viewer, 0 side-on (the widths shrink)."""

    hip_x: float = 0.5
    hip_y: float = 0.58
    lean: float = 0.0
    turn: float = 1.0
    arm_r: tuple[float, float] = (0.15, 0.1)
    arm_l: tuple[float, float] = (0.15, 0.1)
    leg_r: tuple[float, float] = (0.05, 0.0)
    leg_l: tuple[float, float] = (0.05, 0.0)


def keypoints(sk: Skeleton, height: float = 0.8) -> np.ndarray:
    """(18, 3) canvas-unit keypoints of a skeleton, confidence 1. The figure's right side is on
    the image's left (it faces the viewer)."""
    u = height
    hip = np.array([sk.hip_x, sk.hip_y])
    up = np.array([math.sin(sk.lean), -math.cos(sk.lean)])
    neck = hip + u * TORSO * up
    nose = neck + u * _NECK_HEAD * up
    side = np.array([1.0, 0.0]) * max(sk.turn, 0.15)  # never quite zero: keeps limbs apart
    pts = {"neck": neck, "nose": nose}

    def chain(root, angles, lengths, sign):
        a1, a2 = angles
        d1 = np.array([sign * math.sin(a1), math.cos(a1)])
        joint = root + u * lengths[0] * d1
        d2 = np.array([sign * math.sin(a1 + a2), math.cos(a1 + a2)])
        return joint, joint + u * lengths[1] * d2

    for name, sign in (("r", -1.0), ("l", 1.0)):
        shoulder = neck + sign * u * _SHOULDER * side
        hip_side = hip + sign * u * _HIP * side
        elbow, wrist = chain(shoulder, getattr(sk, f"arm_{name}"), (_UPPER_ARM, _FOREARM), sign)
        knee, ankle = chain(hip_side, getattr(sk, f"leg_{name}"), (_THIGH, _SHIN), sign)
        pts.update({f"{name}_shoulder": shoulder, f"{name}_elbow": elbow,
                    f"{name}_wrist": wrist, f"{name}_hip": hip_side, f"{name}_knee": knee,
                    f"{name}_ankle": ankle,
                    f"{name}_eye": nose + u * np.array([sign * _EYE[0] * sk.turn, -_EYE[1]]),
                    f"{name}_ear": nose + u * np.array([sign * _EAR * max(sk.turn, 0.3), 0.0])})
    out = np.ones((len(KEYPOINT_NAMES), 3))
    for k, name in enumerate(KEYPOINT_NAMES):
        out[k, :2] = pts[name]
    return out


def _pos(x: float) -> float:
    return max(0.0, x)


# Each motion: (phase, amplitude) -> Skeleton fields (relative to the rest skeleton).
def _wave(p: float, a: float) -> dict:
    return {"arm_r": (2.4, 0.5 * a * math.sin(2 * p) + 0.3), "arm_l": (0.2, 0.1)}


def _walk(p: float, a: float) -> dict:
    s = math.sin(p)
    return {"hip_x": 0.06 * a * s, "leg_r": (0.05 + 0.3 * a * s, 0.4 * a * _pos(-s)),
            "leg_l": (0.05 - 0.3 * a * s, 0.4 * a * _pos(s)),
            "arm_r": (0.15 - 0.3 * a * s, 0.2), "arm_l": (0.15 + 0.3 * a * s, 0.2)}


def _jump(p: float, a: float) -> dict:
    lift = _pos(math.sin(p))
    crouch = _pos(-math.sin(p))
    return {"hip_y": -0.1 * a * lift + 0.04 * crouch, "arm_r": (0.3 + 2.0 * a * lift, 0.1),
            "arm_l": (0.3 + 2.0 * a * lift, 0.1), "leg_r": (0.05 + 0.5 * crouch, -0.9 * crouch),
            "leg_l": (0.05 + 0.5 * crouch, -0.9 * crouch)}


def _squat(p: float, a: float) -> dict:
    d = a * (1 - math.cos(p)) / 2
    return {"hip_y": 0.09 * d, "leg_r": (0.1 + 0.7 * d, -1.4 * d),
            "leg_l": (0.1 + 0.7 * d, -1.4 * d), "arm_r": (0.15 + 1.2 * d, 0.1),
            "arm_l": (0.15 + 1.2 * d, 0.1)}


def _arms_up(p: float, a: float) -> dict:
    d = a * (1 - math.cos(p)) / 2
    return {"arm_r": (0.15 + 2.6 * d, 0.1), "arm_l": (0.15 + 2.6 * d, 0.1)}


def _turn(p: float, a: float) -> dict:
    return {"turn": 1.0 - 0.85 * a * (1 - math.cos(p)) / 2}


def _kick(p: float, a: float) -> dict:
    k = _pos(math.sin(p))
    return {"leg_l": (0.05 + 1.3 * a * k, -0.5 * a * k), "arm_r": (0.5 + 0.4 * a * k, 0.2),
            "arm_l": (0.4, 0.2), "lean": -0.1 * a * k}


def _jumping_jacks(p: float, a: float) -> dict:
    d = a * (1 - math.cos(p)) / 2
    return {"hip_y": -0.03 * math.sin(2 * p) * a, "arm_r": (0.15 + 2.5 * d, 0.05),
            "arm_l": (0.15 + 2.5 * d, 0.05), "leg_r": (0.05 + 0.35 * d, 0.0),
            "leg_l": (0.05 + 0.35 * d, 0.0)}


MOTIONS = {"wave": _wave, "walk": _walk, "jump": _jump, "squat": _squat, "arms_up": _arms_up,
           "turn": _turn, "kick": _kick, "jumping_jacks": _jumping_jacks}
HELD_OUT_MOTION = "jumping_jacks"  # never in the training data
TRAIN_MOTIONS = tuple(m for m in MOTIONS if m != HELD_OUT_MOTION)
_ADDITIVE = ("hip_x", "hip_y", "lean")


def skeleton_at(motion: str, phase: float, amplitude: float = 1.0, x: float = 0.5,
                y: float = 0.58) -> Skeleton:
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    base = Skeleton(hip_x=x, hip_y=y)
    fields = MOTIONS[motion](phase, amplitude)
    for k in _ADDITIVE:
        if k in fields:
            fields[k] = getattr(base, k) + fields[k]
    return dataclasses.replace(base, **fields)


def clip(motion: str, frames: int, seed: int) -> np.ndarray:
    """(frames, 18, 3) canvas-unit keypoints of one clip of `motion`: speed (0.5-1 cycle per 16
    frames), start phase, amplitude, position and size drawn from `seed`."""
    rng = np.random.default_rng((seed, list(MOTIONS).index(motion) if motion in MOTIONS else 0))
    cycles = rng.uniform(0.5, 1.0) * frames / 16
    phase0 = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.75, 1.15)
    height = rng.uniform(0.68, 0.82)
    x = 0.5 + rng.uniform(-0.08, 0.08)
    y = 0.58 + (0.8 - height) * 0.3
    out = []
    for f in range(frames):
        sk = skeleton_at(motion, phase0 + 2 * math.pi * cycles * f / max(frames, 1), amp, x, y)
        out.append(keypoints(sk, height))
    return np.stack(out)
