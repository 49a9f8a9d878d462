"""`freeanimate animate`: reference image + poses (+ prompt) -> video with FreeAnimate.

    freeanimate animate --reference IMG --poses PATH --out OUT.mp4 [options] [key=value ...]
    freeanimate animate --demo --out demo.mp4       # the built-in toy models, no download

Sizes: the reference is letterboxed to the model size and the poses likewise; the video is cut
back to the reference's aspect (`crop_box`) at the reference's own resolution, but never larger
than its box at the model size (the model's pixels are not upscaled).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from freeanimate_jax import config as cfg
from freeanimate_jax.cli import run
from freeanimate_jax.config import AnimateJob
from freeanimate_jax.io import crop_box, letterbox, load_image
from freeanimate_jax.io.images import InputError
from freeanimate_jax.pose import PoseError, load_poses
from freeanimate_jax.toy.data import demo_case

DEMO_FRAMES = 16


def add_parser(sub: Any) -> None:
    # No abbreviated options: a flag's place on the command line is found by its full name.
    a = sub.add_parser("animate", allow_abbrev=False,
                       help="reference image + poses (+ prompt) -> video",
                       description="Animate --reference with --poses. Settings come from the "
                       "defaults, --config FILE, the options below and trailing key=value "
                       "overrides (later wins), e.g. animate.steps=30 size=[512,384].",
                       epilog=run.config_epilog(AnimateJob))
    a.add_argument("--reference", metavar="IMG", help="the person to animate (any image)")
    a.add_argument("--poses", metavar="PATH", help="OpenPose JSON file/folder, skeleton "
                   "image(s) or skeleton video")
    a.add_argument("--detect", action="store_true", help="--poses is a real (driving) video: "
                   "detect its poses with DWPose and retarget them to the reference (see "
                   "`freeanimate poses` for the options)")
    a.add_argument("--controlnet", metavar="ID|DIR", help="openpose ControlNet folder or hub id")
    a.add_argument("--frames", type=int, metavar="N", help="use only the first N poses")
    run.add_job_options(a, AnimateJob, "the built-in toy models animate a held-out toy figure "
                        "through a held-out motion: no download, no --reference/--poses needed")


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    started = time.perf_counter()
    job, sources = cfg.load_job_sourced(args.config, run.job_items(args, AnimateJob, overrides),
                                        base=cfg.DEMO_CONFIG if args.demo else None,
                                        schema=AnimateJob)
    args.sources = sources
    return run.with_outputs(args.out, lambda outputs: run.run_video(
        args, job, outputs, started, lambda progress: _prepare(args, job, progress)))


def _load_inputs(args: argparse.Namespace, job: AnimateJob, say: Callable[[str], None]):
    size_hw = job.size_hw
    if not args.demo and (args.reference is None or args.poses is None):
        raise InputError("missing --reference IMG and/or --poses PATH; expected both "
                         "(or --demo for the built-in example)")
    # --demo's inputs: the toy world's held-out figure and motion
    demo = demo_case(DEMO_FRAMES, max(size_hw)) if args.demo else None
    if args.reference is not None:
        reference = load_image(args.reference)
    else:
        reference = demo.reference()
    if args.poses is not None and args.detect:
        from freeanimate_jax.pose.detect import detected_pose_frames

        say(f"detecting poses in {args.poses} (DWPose), retargeted to the reference")
        poses = detected_pose_frames(args.poses, size_hw, reference=reference)
    elif args.poses is not None:
        poses = load_poses(args.poses, size_hw)
    else:
        poses = demo.poses(size_hw)
    if len(poses) == 0:
        raise PoseError(f"{args.poses}: 0 pose frames; expected at least one")
    if job.frames is not None:
        if job.frames > len(poses):
            say(f"frames={job.frames}, but the poses have {len(poses)}: using all of them")
        poses = poses[: job.frames]
    ref_in, box = letterbox(reference, size_hw)
    out_hw = (min(reference.shape[0], box[2]), min(reference.shape[1], box[3]))
    return reference, ref_in, box, out_hw, poses


def _prepare(args: argparse.Namespace, job: AnimateJob, progress: run.ConsoleProgress
             ) -> run.VideoRun:
    reference, ref_in, box, out_hw, poses = _load_inputs(args, job, progress.say)
    settings, n = job.settings(), len(poses)

    def check(models: Any) -> None:
        if job.motion_module:
            run.check_motion_window(models.unet, n, "the poses", " (--frames N): animate has "
                                    "no context windows")

    def sample(models: Any, mesh: Any, progress: run.ConsoleProgress) -> run.Sampled:
        from freeanimate_jax.pipelines import animate

        result = animate.FreeAnimate(models, settings, mesh=mesh, progress=progress)(
            ref_in, poses, job.prompt)
        frames = crop_box(result.frames, box, out_hw)
        sheet = {"reference": crop_box(ref_in, box, out_hw),
                 "pose": crop_box(poses, box, out_hw, kind="pose"),
                 "preview": crop_box(result.preview, box, out_hw), "result": frames}
        return run.Sampled(frames, sheet, result.timings, {"preview": result.preview})

    inputs = {"reference": args.reference or "demo", "poses": args.poses or "demo",
              "reference_hw": list(reference.shape[:2]), "frames": n}
    return run.VideoRun(n, bool(job.motion_module), "the poses",
                        f"animating {n} frames at {job.size_hw[0]}x{job.size_hw[1]} (each stage "
                        f"compiles on first use)", inputs, check, sample)
