"""`freeanimate`: the command line (also `python -m freeanimate_jax`).

    freeanimate animate --reference IMG --poses PATH --out OUT.mp4 [options] [key=value ...]
    freeanimate animate --demo --out demo.mp4       # tiny built-in models, no download
    freeanimate fit ...                             # delegated to freeanimate_jax.fit

Bad input is one line on stderr (`freeanimate: error: ...; expected ...`) and exit status 2,
found before any model is loaded or compiled where it can be; nothing is written unless the
whole run succeeds. Genuine bugs still raise with a traceback.

Sizes: the reference is letterboxed to the model size and the poses likewise; the video is cut
back to the reference's aspect (`crop_box`) at the reference's own resolution, but never larger
than its box at the model size (the model's pixels are not upscaled).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from freeanimate_jax import config as cfg
from freeanimate_jax.config import AnimateJob, ConfigError
from freeanimate_jax.io import InputError, contact_sheet, crop_box, letterbox, load_image
from freeanimate_jax.io import video as vio
from freeanimate_jax.pipelines.animate import FreeAnimate
from freeanimate_jax.pipelines.common import Progress
from freeanimate_jax.pose import (
    PoseError,
    demo_keypoints,
    demo_reference,
    load_poses,
    render_sequence,
)
from freeanimate_jax.weights.convert import WeightsError

PROG = "freeanimate"
OUT_SUFFIXES = (".mp4", ".gif", ".npz")
DEMO_FRAMES = 16
EXIT_BAD_INPUT = 2


class OutputError(ValueError):
    """The output cannot be written, or the run produced nothing worth writing."""


USER_ERRORS = (ConfigError, PoseError, InputError, WeightsError, OutputError)


# -- progress -----------------------------------------------------------------------------------
class ConsoleProgress(Progress):
    """Progress on a stream (stdout, so stderr stays for errors): a terminal gets one updating
    line; a log file one line per finished stage."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        super().__init__(enabled, write=self._emit)
        self.talk = enabled

    def _emit(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def show(self, line: str, finished: bool) -> None:
        if self.tty:
            super().show(line, finished)
        elif finished:
            self.write(line + "\n")

    def say(self, text: str) -> None:
        if self.talk:
            self.write(text + "\n")


# -- parsing ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="FreeAnimate: animate a reference image with a pose sequence "
        "(Stable Diffusion 1.5 + openpose ControlNet, training-free).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{animate,fit}")
    a = sub.add_parser("animate", help="reference image + poses (+ prompt) -> video",
                       description="Animate --reference with --poses. Settings come from the "
                       "defaults, --config FILE, the options below and trailing key=value "
                       "overrides (later wins), e.g. animate.steps=30 size=[512,384].",
                       epilog="config keys: " + ", ".join(
                           f.name for f in dataclasses.fields(AnimateJob) if f.name != "animate")
                       + "; and animate.KEY for KEY in: "
                       + ", ".join(f.name for f in dataclasses.fields(cfg.AnimateConfig)))
    a.add_argument("--reference", metavar="IMG", help="the person to animate (any image)")
    a.add_argument("--poses", metavar="PATH", help="OpenPose JSON file/folder, skeleton "
                   "image(s) or skeleton video")
    a.add_argument("--prompt", metavar="TEXT", help="text prompt (config key prompt)")
    a.add_argument("--negative-prompt", metavar="TEXT",
                   help="negative prompt (config key animate.negative_prompt)")
    a.add_argument("--config", metavar="FILE", help="YAML job file (see configs/)")
    a.add_argument("--model", metavar="ID|DIR", help="diffusers SD 1.5 folder or hub id")
    a.add_argument("--controlnet", metavar="ID|DIR", help="openpose ControlNet folder or hub id")
    a.add_argument("--demo", action="store_true", help="built-in tiny models and demo inputs: "
                   "no download, no --reference/--poses needed")
    a.add_argument("--frames", type=int, metavar="N", help="use only the first N poses")
    a.add_argument("--out", required=True, metavar="OUT.(mp4|gif|npz)", help="the video; "
                   "OUT.sheet.png and OUT.json are written next to it")
    a.add_argument("--quiet", action="store_true", help="no progress or summary on stdout. "
                   "The step display appears only on a terminal: JAX does not persist programs "
                   "that call back to the host, so runs from scripts keep every stage in the "
                   "compilation cache")
    a.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    sub.add_parser("fit", help="delegated to freeanimate_jax.fit (run `freeanimate fit -h`)",
                   add_help=False)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The typed CLI options as a config layer (kept out of the dotlist: no YAML re-parsing)."""
    flags: dict[str, Any] = {}
    for key in ("model", "controlnet", "prompt", "frames"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    if args.negative_prompt is not None:
        flags["animate"] = {"negative_prompt": args.negative_prompt}
    return flags


# -- outputs ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outputs:
    video: Path
    sheet: Path
    record: Path
    created_dirs: list[Path]  # made for this run: removed again if it fails

    def remove_created_dirs(self) -> None:
        for d in self.created_dirs:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break  # not empty (someone else wrote there) or already gone: leave it


def prepare_outputs(out: str | Path) -> Outputs:
    """Check the output path before any expensive work: suffix, folder, writability."""
    video = Path(out)
    if video.suffix.lower() not in OUT_SUFFIXES:
        raise OutputError(f"{video}: unsupported output extension {video.suffix!r}; expected "
                          f"{', '.join(OUT_SUFFIXES)}")
    if video.is_dir():
        raise OutputError(f"{video}: is a folder; expected a video file name")
    folder = video.parent
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output folder ({type(e).__name__}); "
                          f"expected a writable folder") from None
    outputs = Outputs(video, video.with_name(f"{video.stem}.sheet.png"),
                      video.with_name(f"{video.stem}.json"), missing)
    try:  # a probe file: permissions alone do not tell (root, ACLs, read-only mounts)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".freeanimate-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        outputs.remove_created_dirs()
        raise OutputError(f"{folder}: output folder is not writable ({type(e).__name__}); "
                          f"expected a folder you can write to") from None
    return outputs


# -- the run ------------------------------------------------------------------------------------
def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache, for every program (the demo's are small and fast to
    compile one by one, but there are many)."""
    import jax

    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"compilation_cache={directory!r}: cannot create it "
                          f"({type(e).__name__}); expected a writable folder, or '' to disable"
                          ) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resolve_dtype(name: str) -> Any:
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def load_models(job: AnimateJob, dtype: Any) -> Any:
    if job.model == cfg.TINY_MODEL:
        from freeanimate_jax.demo import tiny_models

        return tiny_models(0, dtype=dtype)
    from freeanimate_jax.weights.pipeline import load_pipeline

    return load_pipeline(job.model, controlnet=job.controlnet, dtype=dtype,
                         cache_dir=job.weights_cache or None)


def _load_inputs(args: argparse.Namespace, job: AnimateJob, say: Callable[[str], None]):
    size_hw = job.size_hw
    if not args.demo and (args.reference is None or args.poses is None):
        raise InputError("missing --reference IMG and/or --poses PATH; expected both "
                         "(or --demo for the built-in example)")
    if args.reference is not None:
        reference = load_image(args.reference)
    else:
        reference = demo_reference(size_hw)
    if args.poses is not None:
        poses = load_poses(args.poses, size_hw)
    else:
        poses = render_sequence(demo_keypoints(DEMO_FRAMES, size_hw), size_hw)
    if len(poses) == 0:
        raise PoseError(f"{args.poses}: 0 pose frames; expected at least one")
    if job.frames is not None:
        if job.frames > len(poses):
            say(f"frames={job.frames}, but the poses have {len(poses)}: using all of them")
        poses = poses[: job.frames]
    ref_in, box = letterbox(reference, size_hw)
    out_hw = (min(reference.shape[0], box[2]), min(reference.shape[1], box[3]))
    return reference, ref_in, box, out_hw, poses


def _quiet_fork(fn: Callable[..., None], *args: Any) -> None:
    # The MP4 writer starts ffmpeg; JAX warns about any fork once its threads run, but this one
    # is a fork+exec of an external program, which never touches the parent's locks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        fn(*args)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("freeanimate-jax", "jax", "jaxlib", "flax", "numpy", "omegaconf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def animate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    started = time.perf_counter()
    job = cfg.load_job(args.config, overrides, base=cfg.DEMO_CONFIG if args.demo else None,
                       flags=_flags(args))
    outputs = prepare_outputs(args.out)
    try:
        return _run(args, job, outputs, started)
    except BaseException:
        outputs.remove_created_dirs()
        raise


def _run(args: argparse.Namespace, job: AnimateJob, outputs: Outputs, started: float) -> int:
    progress = ConsoleProgress(enabled=not args.quiet)
    # Step callbacks only for a terminal: JAX does not persist programs with host callbacks,
    # and scripted runs (logs, pods) gain more from the compilation cache than from a display.
    progress.enabled = progress.enabled and progress.tty
    reference, ref_in, box, out_hw, poses = _load_inputs(args, job, progress.say)
    settings = job.settings()
    # Everything above is cheap; models, compilation and the run come only after it passed.
    import jax

    from freeanimate_jax import parallel

    enable_compilation_cache(job.compilation_cache)
    dtype = resolve_dtype(job.dtype)
    mesh = parallel.make_mesh() if len(jax.devices()) > 1 else None
    progress.say(f"loading models ({job.model}) in {np.dtype(dtype).name} on "
                 f"{len(jax.devices())} {jax.default_backend()} device(s)")
    clock = time.perf_counter()
    models = load_models(job, dtype)
    load_s = time.perf_counter() - clock
    try:
        pipe = FreeAnimate(models, settings, mesh=mesh, progress=progress)
    except ValueError as e:  # e.g. a scheduler whose timesteps cannot be inverted
        raise ConfigError(f"{job.model}: {e}") from None
    progress.say(f"animating {len(poses)} frames at {job.size_hw[0]}x{job.size_hw[1]} "
                 f"(each stage compiles on first use)")
    progress.t0 = time.perf_counter()
    result = pipe(ref_in, poses, job.prompt)

    bad = [int((~np.isfinite(x.reshape(len(x), -1))).any(1).sum())
           for x in (result.frames, result.preview)]
    if any(bad):
        raise OutputError(f"the result has NaN/inf values ({bad[0]} of {len(poses)} frames, "
                          f"{bad[1]} preview frames; nothing written); expected finite frames: "
                          f"try dtype=float32 or check the weights")
    frames = crop_box(result.frames, box, out_hw)
    sheet = contact_sheet({
        "reference": crop_box(ref_in, box, out_hw),
        "pose": crop_box(poses, box, out_hw, kind="pose"),
        "preview": crop_box(result.preview, box, out_hw),
        "result": frames,
    }, rows=job.sheet_rows)
    timings = {"load_models": load_s, **result.timings}
    timings["total"] = time.perf_counter() - started
    record = {
        "config": {**job.to_dict(), "dtype_resolved": np.dtype(dtype).name},
        "inputs": {"reference": args.reference or "demo", "poses": args.poses or "demo",
                   "reference_hw": list(reference.shape[:2]), "frames": len(poses),
                   "demo": bool(args.demo)},
        "outputs": {"video": outputs.video.name, "sheet": outputs.sheet.name,
                    "json": outputs.record.name, "frames": int(frames.shape[0]),
                    "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                    "fps": job.fps},
        "runtime": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                    "mesh": dict(mesh.shape) if mesh is not None else None},
        "timings": {k: round(float(v), 3) for k, v in timings.items()},
        "versions": _versions(),
        "argv": [PROG, *(args.argv or [])],
    }
    try:
        vio.write_files_atomic([
            (outputs.video, lambda p: _quiet_fork(vio.write_video, p, frames, job.fps)),
            (outputs.sheet, lambda p: vio.write_png_atomic(p, sheet)),
            (outputs.record, lambda p: vio.write_json_atomic(p, record)),
        ])
    except OSError as e:  # a full disk or a folder removed mid-run: the run's fault, not ours
        raise OutputError(f"{outputs.video.parent}: could not write the outputs "
                          f"({type(e).__name__}: {e}; nothing kept); expected a writable folder "
                          f"with free space") from None
    progress.say(f"wrote {outputs.video} ({frames.shape[0]} frames, {frames.shape[1]}x"
                 f"{frames.shape[2]}), {outputs.sheet.name}, {outputs.record.name} in "
                 f"{timings['total']:.1f}s")
    return 0


def _fit(argv: list[str]) -> int:
    try:
        from freeanimate_jax.fit import main as fit_main
    except ModuleNotFoundError as e:
        if e.name != "freeanimate_jax.fit":
            raise
        print(f"{PROG}: error: the fit command is not available in this install; expected "
              f"the freeanimate_jax.fit module", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(fit_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `freeanimate` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":  # everything after `fit` belongs to the fit command
        return _fit(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also sit between options, where argparse leaves them unparsed.
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.argv = argv
    try:
        return animate(args, [*args.overrides, *extra])
    except USER_ERRORS as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
