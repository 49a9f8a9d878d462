"""`freeanimate fit`: does a job fit a TPU slice? Per-chip HBM of each stage, from an
ahead-of-time compile on this host. Exit 0 when every stage fits, 1 when one does not, 2 on
bad arguments (one line on stderr).

    freeanimate fit animate|generate [--topology v5e-8] [--frames N] [--size PX] [--config FILE]
        [--tiny] [--hbm-gib G] [--stages a,b] [--motion v1|v2|v3] [--controlnet] [--json]
        [key=value ...]
    freeanimate fit train [--topology v5e-8] [--frames 16] [--size 256] [--config RUNBOOK]
        [--remat none,full] [--batch N | --max-batch 64] [--tiny] [--hbm-gib G] [--json]
        [key=value ...]

`fit train` compiles the trainer's own step (see `freeanimate_jax/fit/train.py`) for each remat
policy and finds the largest batch per chip that fits by bisection; exit 0 when at least one
clip per chip fits.

Settings come from the same runbooks and `key=value` overrides as `freeanimate animate` and
`generate` (`animate.steps=30`, `generate.context_length=16`, `size=[512,384]`, `dtype`),
read by the same loader. The models are SD1.5's architecture (or the tiny family: `--tiny`,
or `model=builtin:tiny`), built abstractly: their weights' files are not read, so a runbook's
model ids do not change the fit, and the motion-module layout of `fit generate` is `--motion`
(v1, v2, v3); a runbook's `controlnet` adds the ControlNet as `--controlnet` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from freeanimate_jax import config as cfg
from freeanimate_jax import platform
from freeanimate_jax.config import AnimateJob, ConfigError, GenerateJob, TrainJob
from freeanimate_jax.fit.core import TOPOLOGIES

PIPELINES = ("animate", "generate", "train")


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage; we want one line
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="freeanimate fit", description="Per-chip HBM of each stage of a pipeline "
                "on a TPU topology, from an ahead-of-time compile on this host.")
    p.add_argument("pipeline", help=" or ".join(PIPELINES))
    p.add_argument("--topology", default="v5e-8", help=", ".join(TOPOLOGIES))
    p.add_argument("--frames", type=int, default=None,
                   help="frames (default: the job's generate.frames, or 16 poses for animate)")
    p.add_argument("--size", type=int, default=None,
                   help="square frame size, pixels (default: the job's size)")
    p.add_argument("--config", metavar="FILE", help="YAML job file (see configs/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tiny", action="store_true", help="the tiny model family (quick checks)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="HBM per chip to fit into (default: the chip's usable HBM)")
    p.add_argument("--stages", default=None,
                   help="compile only these stages (comma-separated; the rest are only traced)")
    p.add_argument("--motion", default="v3", help="generate: the motion-module layout, v1, v2 "
                   "or v3 (default v3: no mid-block module, 32 positions)")
    p.add_argument("--controlnet", action="store_true",
                   help="generate: with the openpose ControlNet on every frame")
    p.add_argument("--remat", default=None, help="train: remat policies to compile, "
                   "comma-separated (default none,full)")
    p.add_argument("--batch", type=int, default=None,
                   help="train: compile this batch per chip only (default: search)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="train: the largest batch per chip the search tries (default 64)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, as for the run commands")
    return p


def _stages(text: str | None, known: tuple[str, ...]) -> set[str] | None:
    if text is None:
        return None
    only = {x.strip() for x in text.split(",")}
    if not only or not only <= set(known):
        raise UsageError(f"unknown stage in --stages {text!r}; expected some of "
                         f"{', '.join(known)}")
    return only


def _job(a: argparse.Namespace):
    schema = {"animate": AnimateJob, "generate": GenerateJob, "train": TrainJob}[a.pipeline]
    flags: dict[str, typing.Any] = {}
    if a.size is not None:
        flags["size"] = a.size
    frames_key = {"generate": "generate", "train": "data"}.get(a.pipeline)
    if frames_key and a.frames is not None:
        flags[frames_key] = {"frames": a.frames}
    if frames_key and any(x.startswith(f"{frames_key}.frames=") for x in a.overrides):
        raise UsageError(f"give the frame count as --frames, not {frames_key}.frames=")
    base = cfg.DEMO_TRAIN_CONFIG if a.pipeline == "train" and a.tiny else None
    try:
        return cfg.load_job(a.config, a.overrides, schema=schema, flags=flags, base=base)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _plan(argv: list[str]):
    """Checked arguments -> (function that fits, function that formats the report as text);
    the formatter is None with --json."""
    a = _parser().parse_intermixed_args(argv)  # key=value may follow options
    if a.pipeline not in PIPELINES:
        raise UsageError(f"unknown pipeline {a.pipeline!r}; expected one of "
                         f"{', '.join(PIPELINES)}")
    if a.topology not in TOPOLOGIES:
        raise UsageError(f"unknown topology {a.topology!r}; expected one of "
                         f"{', '.join(TOPOLOGIES)}")
    if any(v is not None and v <= 0 for v in (a.frames, a.size, a.hbm_gib, a.batch,
                                                 a.max_batch)):
        raise UsageError("--frames, --size, --hbm-gib, --batch and --max-batch must be positive")
    if a.pipeline != "train" and (a.remat or a.batch):
        raise UsageError("--remat and --batch are options of fit train")
    job = _job(a)
    if a.pipeline == "train":
        return _plan_train(a, job)
    tiny = a.tiny or job.model == cfg.TINY_MODEL
    size_hw = job.size_hw
    # The VAE downsamples 8x and the SD UNet 8x more (the tiny one 2x).
    multiple = 8 * (2 if tiny else 8)
    if size_hw[0] % multiple or size_hw[1] % multiple:
        raise UsageError(f"size {job.size} must be a multiple of {multiple}")
    # The runbook's dtype; "auto" is what a TPU runs: bfloat16.
    dtype = "bfloat16" if job.dtype == "auto" else job.dtype
    common = dict(tiny=tiny, dtype=dtype, hbm_gib=a.hbm_gib, log=_progress)
    settings = job.settings()
    if a.pipeline == "animate":
        from freeanimate_jax.fit import animate

        if a.motion != "v3" or a.controlnet:
            raise UsageError("--motion and --controlnet are options of fit generate (animate "
                             "always runs the openpose ControlNet, without motion modules)")
        only = _stages(a.stages, animate.STAGES)
        if only is not None and settings.preview_steps == settings.steps:
            only.discard("preview reference inversion")  # it runs only for other step counts
            if not only:
                raise UsageError("--stages: preview reference inversion runs only when "
                                 "preview_steps differs from steps")
        frames = a.frames or job.frames or 16
        return (lambda: animate.fit_animate(a.topology, frames, size_hw, settings, only=only,
                                            **common)), None if a.json else animate.format_report
    from freeanimate_jax.fit import generate

    if a.motion not in generate.MOTION_VERSIONS:
        raise UsageError(f"unknown --motion {a.motion!r}; expected one of "
                         f"{', '.join(generate.MOTION_VERSIONS)}")
    only = _stages(a.stages, generate.STAGES)
    # A per-frame ControlNet: --controlnet, or a runbook that names one.
    controlnet = a.controlnet or bool(job.controlnet)
    return (lambda: generate.fit_generate(
        a.topology, settings, size_hw, motion=a.motion, controlnet=controlnet, only=only,
        **common)), None if a.json else generate.format_report


def _plan_train(a: argparse.Namespace, job: TrainJob):
    from freeanimate_jax.fit import train
    from freeanimate_jax.train.settings import REMAT

    if a.stages or a.motion != "v3" or a.controlnet:
        raise UsageError("--stages, --motion and --controlnet are not options of fit train "
                         "(the layout is the runbook's train.motion)")
    remats = tuple(x.strip() for x in (a.remat or ",".join(train.REMATS)).split(","))
    if not remats or not set(remats) <= set(REMAT):
        raise UsageError(f"unknown --remat {a.remat!r}; expected some of {', '.join(REMAT)}")
    try:
        data, _, _, loop, _ = job.sections()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if loop.motion == "none" or job.controlnet or job.motion_module:
        raise UsageError("fit train compiles a new motion module's training (train.motion "
                         "v1, v2 or v3, no controlnet or motion_module)")
    tiny = a.tiny or job.model == cfg.TINY_MODEL
    if tiny and job.model != cfg.TINY_MODEL:
        job = dataclasses.replace(job, model=cfg.TINY_MODEL)
    multiple = 8 * (2 if tiny else 8)
    if job.size_hw[0] % multiple or job.size_hw[1] % multiple:
        raise UsageError(f"size {job.size} must be a multiple of {multiple}")
    dtype = "bfloat16" if job.dtype == "auto" else job.dtype
    return (lambda: train.fit_train(
        a.topology, job, data.frames, job.size_hw, remats=remats, batch=a.batch,
        max_batch=a.max_batch, dtype=dtype, hbm_gib=a.hbm_gib, log=_progress)
            ), None if a.json else train.format_report


def _progress(message: str) -> None:  # compiles take minutes: say what is going on
    print(f"[fit] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    try:
        run, fmt = _plan(argv)
    except UsageError as e:
        print(f"freeanimate fit: {e}", file=sys.stderr)
        return 2
    # An ahead-of-time check: run on the CPU even on a TPU host (a real TPU may be busy), and
    # let libtpu's compile-only client load beside another process already holding libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    platform.quiet_libtpu()
    if not platform.user_chose():  # not a GPU's client either (it would preallocate memory)
        import jax

        jax.config.update("jax_platforms", "cpu")
    try:
        report = run()
    except ValueError as e:  # what the pipeline itself refuses (frame counts, position tables)
        print(f"freeanimate fit: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if fmt is None else fmt(report))
    return 0 if report["fits"] else 1
