"""The `freeanimate fit` command line: arguments in, one report out; exit 0 when every stage
fits, 1 when one does not, 2 on bad arguments (one line on stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from freeanimate_jax.fit.core import TOPOLOGIES, UsageError, parse_settings

PIPELINES = ("animate", "generate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage; we want one line
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="freeanimate fit", description="Per-chip HBM of each stage of a pipeline "
                "on a TPU topology, from an ahead-of-time compile on this host.")
    p.add_argument("pipeline", help=" or ".join(PIPELINES))
    p.add_argument("--topology", default="v5e-8", help=", ".join(TOPOLOGIES))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="square frame size, pixels")
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
    p.add_argument("overrides", nargs="*",
                   help="settings fields (AnimateSettings or GenerateSettings), key=value")
    return p


def _stages(text: str | None, known: tuple[str, ...]) -> set[str] | None:
    if text is None:
        return None
    only = {x.strip() for x in text.split(",")}
    if not only or not only <= set(known):
        raise UsageError(f"unknown stage in --stages {text!r}; expected some of "
                         f"{', '.join(known)}")
    return only


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
    if a.frames < 1 or a.size < 1 or (a.hbm_gib is not None and a.hbm_gib <= 0):
        raise UsageError("--frames, --size and --hbm-gib must be positive")
    # The VAE downsamples 8x and the SD UNet 8x more (the tiny one 2x).
    multiple = 8 * (2 if a.tiny else 8)
    if a.size % multiple:
        raise UsageError(f"--size {a.size} must be a multiple of {multiple}")
    common = dict(tiny=a.tiny, hbm_gib=a.hbm_gib, log=_progress)
    if a.pipeline == "animate":
        from freeanimate_jax.fit import animate
        from freeanimate_jax.pipelines.animate import AnimateSettings

        if a.motion != "v3" or a.controlnet:
            raise UsageError("--motion and --controlnet are options of fit generate (animate "
                             "always runs the openpose ControlNet, without motion modules)")
        settings = parse_settings(AnimateSettings, a.overrides)
        only = _stages(a.stages, animate.STAGES)
        if only is not None and settings.preview_steps == settings.steps:
            only.discard("preview reference inversion")  # it runs only for other step counts
            if not only:
                raise UsageError("--stages: preview reference inversion runs only when "
                                 "preview_steps differs from steps")
        return (lambda: animate.fit_animate(a.topology, a.frames, a.size, settings, only=only,
                                            **common)), None if a.json else animate.format_report
    from freeanimate_jax.fit import generate
    from freeanimate_jax.pipelines.generate import GenerateSettings

    if a.motion not in generate.MOTION_VERSIONS:
        raise UsageError(f"unknown --motion {a.motion!r}; expected one of "
                         f"{', '.join(generate.MOTION_VERSIONS)}")
    if any(x.startswith("frames=") for x in a.overrides):
        raise UsageError("give the frame count as --frames, not frames=")
    settings = parse_settings(GenerateSettings, [f"frames={a.frames}", *a.overrides])
    only = _stages(a.stages, generate.STAGES)
    return (lambda: generate.fit_generate(
        a.topology, settings, a.size, motion=a.motion, controlnet=a.controlnet, only=only,
        **common)), None if a.json else generate.format_report


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
    if "JAX_PLATFORMS" not in os.environ:
        import jax

        jax.config.update("jax_platforms", "cpu")
    try:
        report = run()
    except ValueError as e:  # what the pipeline itself refuses (frame counts, position tables)
        print(f"freeanimate fit: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if fmt is None else fmt(report))
    return 0 if report["fits"] else 1
