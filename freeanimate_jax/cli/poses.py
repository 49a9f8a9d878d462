"""`freeanimate poses`: a driving video (or images) -> OpenPose-18 JSON per frame and rendered
skeletons, the input `--poses` takes.

    freeanimate poses dance.mp4 --out poses/ [--retarget-to person.png] [--smooth 5]
        [--pose-model FILE|hf://...] [--det-model FILE|hf://...|none] [--pose-input 288x384]

Writes poses/frame_00000.json ... and poses/skeleton_00000.png ... (all or nothing). The
detector is DWPose through rtmlib on onnxruntime (`pose/detect.py`); hands and face are not
kept. Retargeting gives the driving motion the reference's bone lengths and position.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from freeanimate_jax.pose import detect

PROG = "freeanimate poses"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Detect one person's pose in every "
                                "frame of a video, an image or a folder of images.")
    p.add_argument("input", metavar="VIDEO_OR_IMAGES")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--pose-model", default=detect.DWPOSE_MODEL, metavar="FILE",
                   help="ONNX pose model, local or hf://owner/repo/file.onnx (default: "
                   f"{detect.DWPOSE_MODEL}, Apache-2.0)")
    p.add_argument("--det-model", default=detect.YOLOX_MODEL, metavar="FILE|none",
                   help=f"ONNX person detector (default: {detect.YOLOX_MODEL}); none: the "
                   "whole frame is the person's box")
    p.add_argument("--pose-input", default="x".join(map(str, detect.DWPOSE_INPUT)),
                   metavar="WxH", help="the pose model's input size (default: %(default)s)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="moving average of each keypoint over N frames (default: 1, none)")
    p.add_argument("--retarget-to", metavar="IMG", help="the reference image: its detected "
                   "bone lengths and position replace the driving person's")
    return p


def _frames(path: Path) -> list[np.ndarray]:
    from freeanimate_jax.io.images import load_image
    from freeanimate_jax.io.video import read_video
    from freeanimate_jax.pose.keypoints import natural_key
    from freeanimate_jax.pose.sequence import IMAGE_SUFFIXES

    if path.is_dir():
        files = sorted((f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                       key=natural_key)
        if not files:
            raise detect.PoseError(f"{path}: no images in the folder; expected frames "
                                   f"({', '.join(IMAGE_SUFFIXES)})")
        return [load_image(f) for f in files]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [load_image(path)]
    return list(read_video(path)[0])


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return w, h
    except ValueError:
        raise detect.PoseError(f"--pose-input {text!r}; expected WxH, e.g. 288x384") from None


def run(args: argparse.Namespace) -> int:
    from freeanimate_jax.io.atomic import staged
    from freeanimate_jax.io.images import InputError, load_image
    from freeanimate_jax.pose.render import render_pose

    source, out = Path(args.input), Path(args.out)
    if not source.exists():
        raise detect.PoseError(f"{source}: no such file or folder; expected a video, an image "
                               f"or a folder of images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder; expected a new folder")
    frames = _frames(source)
    det = detect.Detector(args.pose_model, None if args.det_model in ("", "none")
                          else args.det_model, _size(args.pose_input))
    track = detect.smooth(det.video(frames), args.smooth)
    canvas = frames[0].shape[:2]
    if args.retarget_to:  # the retargeted poses live in the reference's pixels
        reference = load_image(args.retarget_to)
        track, canvas = detect.retarget(track, det(reference)), reference.shape[:2]
    if out.exists():
        out.rmdir()  # empty: replaced by the staged folder as a whole
    with staged(out, folder=True) as tmp:
        from PIL import Image

        for i, pose in enumerate(track):
            (tmp / f"frame_{i:05d}.json").write_text(
                json.dumps(detect.to_openpose_json(pose, canvas)))
            Image.fromarray(render_pose(pose, canvas)).save(tmp / f"skeleton_{i:05d}.png")
    seen = (track[..., 2] > 0.3).sum(-1)
    print(f"wrote {out}/: {len(track)} frames, {seen.mean():.1f} of 18 keypoints seen per frame")
    return 0


def main(argv: list[str]) -> int:
    from freeanimate_jax.io.images import InputError
    from freeanimate_jax.weights.errors import WeightsError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (detect.PoseError, InputError, WeightsError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
