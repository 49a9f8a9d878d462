"""Poses from a driving video or images: DWPose (RTMPose-style SimCC keypoints, COCO body order)
through rtmlib on onnxruntime, converted to OpenPose-18, optionally smoothed over time and
retargeted to the reference's proportions, as pose-guided animation tools prepare them.

Models are ONNX files, local or `hf://owner/repo/file.onnx` (downloaded once into the
huggingface cache). Defaults: DWPose's whole-body model and its YOLOX person detector from
`yzd-v/DWPose` (Apache-2.0). The first 17 of DWPose's 133 whole-body points are COCO's body;
hands and face are not used. Without a detector model the whole frame is the person's box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from freeanimate_jax.pose.keypoints import NUM_KEYPOINTS, PoseError

DWPOSE_MODEL = "hf://yzd-v/DWPose/dw-ll_ucoco_384.onnx"
DWPOSE_INPUT = (288, 384)  # (width, height) of the pose model's crop
YOLOX_MODEL = "hf://yzd-v/DWPose/yolox_l.onnx"
YOLOX_INPUT = (640, 640)

# COCO-17 index of each OpenPose-18 point; the neck (1) is the shoulders' midpoint.
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose-18 bones as (parent, child), from the neck outwards: the retargeting tree.
BONES = ((1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
         (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))


def coco_to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(..., 17+, 2) COCO body keypoints and (..., 17+) scores -> (..., 18, 3) OpenPose-18
    (x, y, score); the neck is the shoulders' midpoint, scored by the weaker shoulder."""
    kp, sc = np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)
    out = np.zeros((*kp.shape[:-2], NUM_KEYPOINTS, 3))
    for j, c in enumerate(COCO_TO_OPENPOSE):
        if c is None:
            out[..., j, :2] = (kp[..., 5, :] + kp[..., 6, :]) / 2
            out[..., j, 2] = np.minimum(sc[..., 5], sc[..., 6])
        else:
            out[..., j, :2], out[..., j, 2] = kp[..., c, :], sc[..., c]
    return out


@dataclasses.dataclass
class Detector:
    """One person's OpenPose-18 keypoints per frame: the largest box of the person detector
    (or the whole frame), then the pose model's SimCC keypoints in that box."""

    pose_model: str = DWPOSE_MODEL
    det_model: str | None = YOLOX_MODEL
    pose_input: tuple[int, int] = DWPOSE_INPUT
    device: str = "cpu"

    def __post_init__(self) -> None:
        try:
            from rtmlib import YOLOX, RTMPose
        except ImportError as e:
            raise PoseError(f"pose detection needs rtmlib and onnxruntime ({e}); expected "
                            f"pip install 'freeanimate-jax[poses]'") from None
        from freeanimate_jax.weights.loader import resolve_file

        def session(make, spec: str, what: str):
            path = resolve_file(spec, what)
            if not path.is_file():
                raise PoseError(f"{what} {path}: no such file; expected an ONNX model (local, "
                                f"or hf://owner/repo/file.onnx)")
            try:
                return make(str(path))
            except Exception as e:  # not ONNX, or not this kind of model: one line
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise PoseError(f"{what} {path}: could not be loaded ({type(e).__name__}: "
                                f"{first}); expected an ONNX {what}") from None

        self._pose = session(lambda f: RTMPose(f, model_input_size=tuple(self.pose_input),
                                               backend="onnxruntime", device=self.device),
                             self.pose_model, "pose model")
        self._det = None
        if self.det_model:
            self._det = session(lambda f: YOLOX(f, model_input_size=YOLOX_INPUT,
                                                backend="onnxruntime", device=self.device),
                                self.det_model, "person detector")

    def __call__(self, frame_rgb: np.ndarray) -> np.ndarray:
        """(18, 3) keypoints of the main person in one RGB uint8 frame (all zero: nobody)."""
        bgr = np.ascontiguousarray(frame_rgb[..., ::-1])  # rtmlib works in OpenCV's BGR
        boxes: Any = []
        if self._det is not None:
            boxes = self._det(bgr)
            if len(boxes) == 0:
                return np.zeros((NUM_KEYPOINTS, 3))
            areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
            boxes = [boxes[int(np.argmax(areas))]]  # the main (largest) person
        keypoints, scores = self._pose(bgr, bboxes=boxes)
        return coco_to_openpose(keypoints[0, :17], scores[0, :17])

    def video(self, frames: Iterable[np.ndarray]) -> np.ndarray:
        return np.stack([self(f) for f in frames])


def smooth(track: np.ndarray, window: int, threshold: float = 0.3) -> np.ndarray:
    """A centred moving average of each keypoint over `window` frames, over the frames where it
    was seen (a missing point stays missing): detector jitter, not motion, goes."""
    if window <= 1:
        return track.copy()
    out, half = track.copy(), window // 2
    seen = track[..., 2] > threshold
    for t in range(len(track)):
        lo, hi = max(0, t - half), min(len(track), t + half + 1)
        for j in range(track.shape[1]):
            if seen[t, j]:
                near = seen[lo:hi, j]
                out[t, j, :2] = track[lo:hi, j, :2][near].mean(0)
    return out


def retarget(driving: np.ndarray, reference: np.ndarray, threshold: float = 0.3
             ) -> np.ndarray:
    """The driving track (F, 18, 3) with the reference's bone lengths (from its (18, 3) pose)
    and its neck position: each bone keeps the driving pose's angle, the neck's motion is the
    driving neck's, scaled by the ratio of the two shoulder-to-hip heights. A point missing in
    either pose (or whose parent is missing) stays missing."""
    drv, ref = np.asarray(driving, np.float64), np.asarray(reference, np.float64)
    seen_r = ref[:, 2] > threshold
    if not seen_r[1]:
        raise PoseError("retargeting: the reference's neck was not detected; expected a "
                        "reference with a visible upper body")

    def torso(p: np.ndarray, seen: np.ndarray) -> float | None:
        hips = [h for h in (8, 11) if seen[h]]
        if not seen[1] or not hips:
            return None
        return float(np.linalg.norm(p[hips, :2].mean(0) - p[1, :2]))

    out = np.zeros_like(drv)
    first = next((t for t in range(len(drv)) if drv[t, 1, 2] > threshold), None)
    if first is None:
        return out
    scale = (torso(ref, seen_r) or 1.0) / (torso(drv[first], drv[first, :, 2] > threshold)
                                            or 1.0)
    for t, pose in enumerate(drv):
        seen = (pose[:, 2] > threshold) & seen_r
        if not pose[1, 2] > threshold:
            continue
        out[t, 1, :2] = ref[1, :2] + (pose[1, :2] - drv[first, 1, :2]) * scale
        out[t, 1, 2] = pose[1, 2]
        for parent, child in BONES:
            if not (seen[child] and out[t, parent, 2] > threshold):
                continue
            direction = pose[child, :2] - pose[parent, :2]
            norm = np.linalg.norm(direction)
            length = np.linalg.norm(ref[child, :2] - ref[parent, :2])
            unit = direction / norm if norm > 0 else np.zeros(2)
            out[t, child, :2] = out[t, parent, :2] + unit * length
            out[t, child, 2] = pose[child, 2]
    return out


def to_openpose_json(pose: np.ndarray, canvas_hw: tuple[int, int]) -> dict:
    """One frame in OpenPose's JSON layout (what `--poses` and `read_keypoints` read)."""
    return {"version": 1.3, "canvas_height": int(canvas_hw[0]), "canvas_width": int(canvas_hw[1]),
            "people": [{"pose_keypoints_2d": [round(float(v), 3) for v in pose.reshape(-1)]}]}


def detected_pose_frames(source: str, size_hw: tuple[int, int], *,
                         reference: np.ndarray | None = None, smooth_window: int = 1,
                         pose_model: str = DWPOSE_MODEL, det_model: str | None = YOLOX_MODEL,
                         pose_input: tuple[int, int] = DWPOSE_INPUT) -> np.ndarray:
    """`--poses VIDEO --detect`: the driving video's detected poses, retargeted to `reference`
    when given, rendered at the video's size (the reference's, retargeted) and letterboxed to
    `size_hw` (as a skeleton video is), (F, H, W, 3) uint8."""
    from pathlib import Path

    from freeanimate_jax.io.images import letterbox
    from freeanimate_jax.io.video import read_video
    from freeanimate_jax.pose.render import render_sequence

    if not Path(source).is_file():
        raise PoseError(f"{source}: no such file; --detect expects a driving video")
    frames = read_video(source)[0]
    det = Detector(pose_model, det_model, pose_input)
    track = smooth(det.video(frames), smooth_window)
    canvas = frames.shape[1:3]
    if reference is not None:  # the retargeted poses live in the reference's pixels
        track, canvas = retarget(track, det(reference)), reference.shape[:2]
    drawn = render_sequence(track, canvas)
    return np.stack([letterbox(f, size_hw, kind="pose")[0] for f in drawn])
