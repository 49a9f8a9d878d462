"""`freeanimate`: the command line (also `python -m freeanimate_jax`).

    freeanimate animate --reference IMG --poses PATH --out OUT.mp4 [options] [key=value ...]
    freeanimate animate --demo --out demo.mp4       # the built-in toy models, no download
    freeanimate generate --prompt TEXT --out OUT.mp4 [options] [key=value ...]
    freeanimate fit animate|generate --topology v5e-8 [options] [key=value ...]
    freeanimate train prepare-data|cache|run|export [options] [key=value ...]
    freeanimate poses VIDEO_OR_IMAGES --out DIR [options]
    freeanimate eval SET_DIR --out TABLE.md          # toy-world videos against ground truth
    freeanimate toy build|ablation [options]         # the toy family: train it, measure it

One module per command (`animate`, `generate`, `fit`, `train`); what the video commands
share, the run skeleton included, is `run`. Model assembly is the library's (`weights/assemble.py`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from freeanimate_jax.cli import animate, generate
from freeanimate_jax.cli.run import EXIT_BAD_INPUT, PROG, USER_ERRORS

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="FreeAnimate: animate a reference image with a pose sequence "
        "(Stable Diffusion 1.5 + openpose ControlNet, training-free); AnimateDiff text-to-video.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{animate,generate,fit,train,poses,eval,toy}")
    animate.add_parser(sub)
    generate.add_parser(sub)
    sub.add_parser("fit", help="does a job fit a TPU slice? (run `freeanimate fit -h`)",
                   add_help=False)
    sub.add_parser("train", help="train motion modules on video (run `freeanimate train -h`)",
                   add_help=False)
    sub.add_parser("poses", help="poses from a driving video or images (run `freeanimate "
                   "poses -h`)", add_help=False)
    sub.add_parser("eval", help="score toy-world videos against ground truth (run "
                   "`freeanimate eval -h`)", add_help=False)
    sub.add_parser("toy", help="train the toy family, run its ablation (run `freeanimate toy "
                   "-h`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `freeanimate` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after these words belongs to that command's own parser.
    if argv and argv[0] in ("fit", "poses", "train", "eval", "toy"):
        module = importlib.import_module(f"freeanimate_jax.cli.{argv[0]}")
        return int(module.main(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also sit between options, where argparse leaves them unparsed.
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.argv = argv
    command = generate.main if args.command == "generate" else animate.main
    try:
        return command(args, [*args.overrides, *extra])
    except USER_ERRORS as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130



