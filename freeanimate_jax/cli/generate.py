"""`freeanimate generate`: AnimateDiff text-to-video from the command line.

    freeanimate generate --prompt TEXT --out OUT.mp4 [--model ID|DIR|FILE.safetensors]
        [--motion-module ID|DIR|FILE] [--motion-lora FILE[:SCALE]] [--domain-adapter FILE[:SCALE]]
        [--lora FILE[:SCALE]] [--controlnet ID|DIR --poses PATH] [--config FILE] [key=value ...]
    freeanimate generate --demo --out demo.mp4     # the built-in toy models, no download

Models are assembled by `weights/assemble.py` (as for `animate`, which takes a motion module
too); outputs, errors, progress and the compilation cache behave as for `animate`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from freeanimate_jax import config as cfg
from freeanimate_jax.cli import run
from freeanimate_jax.config import GenerateJob
from freeanimate_jax.io import InputError
from freeanimate_jax.pose import PoseError, load_poses
from freeanimate_jax.toy.data import demo_case


def add_parser(sub: Any) -> None:
    # No abbreviated options: a flag's place on the command line is found by its full name.
    g = sub.add_parser("generate", allow_abbrev=False,
                       help="prompt (+ poses) -> video with AnimateDiff",
                       description="Text-to-video with an SD 1.5 model and an AnimateDiff motion "
                       "module. Settings come from the defaults, --config FILE, the options "
                       "below and trailing key=value overrides (later wins), e.g. "
                       "generate.frames=24 generate.context_length=16.",
                       epilog=run.config_epilog(GenerateJob))
    g.add_argument("--controlnet", metavar="ID|DIR", help="optional per-frame ControlNet "
                   "(with --poses)")
    g.add_argument("--poses", metavar="PATH", help="control frames for --controlnet: OpenPose "
                   "JSON file/folder, skeleton image(s) or video (the first generate.frames)")
    run.add_job_options(g, GenerateJob, "the built-in toy models (SD family and motion "
                        "module) make a toy figure from a caption: no download; 16 frames at "
                        "64x64")


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    started = time.perf_counter()
    job, sources = cfg.load_job_sourced(args.config, run.job_items(args, GenerateJob, overrides),
                                        base=cfg.DEMO_GENERATE_CONFIG if args.demo else None,
                                        schema=GenerateJob)
    args.sources = sources
    return run.with_outputs(args.out, lambda outputs: run.run_video(
        args, job, outputs, started, lambda progress: _prepare(args, job)))


def _poses(args: argparse.Namespace, job: GenerateJob, frames: int) -> np.ndarray | None:
    """The control frames: the first `frames` of --poses (the demo's poses with --demo), or
    None without a ControlNet."""
    if not job.controlnet or (args.poses is None and not args.demo):
        if job.controlnet or args.poses is not None:
            raise InputError("--controlnet and --poses go together; expected both or neither "
                             "(config key controlnet)")
        return None
    if args.poses is None:
        return demo_case(frames, max(job.size_hw)).poses(job.size_hw)  # the toy's motion
    poses = load_poses(args.poses, job.size_hw)
    if len(poses) < frames:
        raise PoseError(f"{args.poses}: {len(poses)} pose frames for generate.frames={frames}; "
                        f"expected at least one pose per frame")
    return poses[:frames]


def _prepare(args: argparse.Namespace, job: GenerateJob) -> run.VideoRun:
    if not job.prompt.strip():
        raise InputError("no prompt; expected --prompt TEXT (or the config key prompt)")
    settings = job.settings()
    poses = _poses(args, job, settings.frames)

    def check(models: Any) -> None:
        if settings.context_length is None:
            run.check_motion_window(models.unet, settings.frames, "generate.frames",
                                    ", or generate.context_length=16 for sliding context "
                                    "windows")
        else:
            run.check_motion_window(models.unet, min(settings.context_length, settings.frames),
                                    "generate.context_length")

    def sample(models: Any, mesh: Any, progress: run.ConsoleProgress) -> run.Sampled:
        from freeanimate_jax.pipelines import generate

        result = generate.Generate(models, settings, mesh=mesh, progress=progress)(
            job.prompt, job.size_hw, poses)
        timings = {k: v for k, v in result.timings.items() if k != "total"}  # the run's own
        sheet = {"pose": poses, "result": result.frames} if poses is not None \
            else {"result": result.frames}
        return run.Sampled(result.frames, sheet, timings)

    inputs = {"prompt": job.prompt, "poses": args.poses or ("demo" if poses is not None else None),
              "frames": settings.frames}
    return run.VideoRun(settings.frames, True, "generate.frames",
                        f"generating {settings.frames} frames at {job.size_hw[0]}x"
                        f"{job.size_hw[1]} (compiles on first use)", inputs, check, sample)
