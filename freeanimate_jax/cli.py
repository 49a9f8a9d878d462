"""`freeanimate`: the command line (also `python -m freeanimate_jax`).

    freeanimate animate --reference IMG --poses PATH --out OUT.mp4 [options] [key=value ...]
    freeanimate animate --demo --out demo.mp4       # tiny built-in models, no download
    freeanimate generate --prompt TEXT --out OUT.mp4 [options] [key=value ...]  # cli_generate
    freeanimate fit ...                             # delegated to freeanimate_jax.fit

This module: `animate`, and the run machinery both video commands share (output checks, atomic
writes, progress, errors, the run record); their shared options and model assembly: cli_generate.

Bad input is one line on stderr (`freeanimate: error: ...; expected ...`) and exit status 2,
found before any model is loaded or compiled where it can be; nothing is written unless the
whole run succeeds. Genuine bugs still raise with a traceback.

Sizes: the reference is letterboxed to the model size and the poses likewise; the video is cut
back to the reference's aspect (`crop_box`) at the reference's own resolution, but never larger
than its box at the model size (the model's pixels are not upscaled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from freeanimate_jax import cli_generate
from freeanimate_jax import config as cfg
from freeanimate_jax.cli_generate import add_job_options, check_motion_window, config_epilog
from freeanimate_jax.config import AnimateJob, ConfigError, Job
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
        "(Stable Diffusion 1.5 + openpose ControlNet, training-free); AnimateDiff text-to-video.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{animate,generate,fit}")
    a = sub.add_parser("animate", help="reference image + poses (+ prompt) -> video",
                       description="Animate --reference with --poses. Settings come from the "
                       "defaults, --config FILE, the options below and trailing key=value "
                       "overrides (later wins), e.g. animate.steps=30 size=[512,384].",
                       epilog=config_epilog(AnimateJob))
    a.add_argument("--reference", metavar="IMG", help="the person to animate (any image)")
    a.add_argument("--poses", metavar="PATH", help="OpenPose JSON file/folder, skeleton "
                   "image(s) or skeleton video")
    a.add_argument("--controlnet", metavar="ID|DIR", help="openpose ControlNet folder or hub id")
    a.add_argument("--frames", type=int, metavar="N", help="use only the first N poses")
    add_job_options(a, AnimateJob, "built-in tiny models and demo inputs: no download, no "
                    "--reference/--poses needed")
    cli_generate.add_parser(sub)
    sub.add_parser("fit", help="delegated to freeanimate_jax.fit (run `freeanimate fit -h`)",
                   add_help=False)
    return parser


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


def make_progress(args: argparse.Namespace) -> ConsoleProgress:
    progress = ConsoleProgress(enabled=not args.quiet)
    # Step callbacks only for a terminal: JAX does not persist programs with host callbacks,
    # and scripted runs (logs, pods) gain more from the compilation cache than from a display.
    progress.enabled = progress.enabled and progress.tty
    return progress


def start_runtime(job: Job, frames: int | None = None, what: str = "") -> tuple[Any, Any]:
    """Compilation cache, dtype and a frame mesh over all devices (when more than one).
    `frames`: a video that must divide over the mesh (a motion module sees every frame, so
    padding would change the video)."""
    import jax

    from freeanimate_jax import parallel

    if os.environ.get("FREEANIMATE_DISTRIBUTED") == "1":  # run_tpu.sh sets it on every host
        try:
            parallel.initialize_distributed()
        except ValueError as e:
            raise ConfigError(f"FREEANIMATE_DISTRIBUTED=1: {e}") from None
    mesh = parallel.make_mesh() if len(jax.devices()) > 1 else None
    if mesh is not None and frames is not None and frames % mesh.size:
        raise ConfigError(f"{what}: {frames} frames do not divide over {mesh.size} devices; "
                          f"expected a multiple of {mesh.size} (a motion module sees the whole "
                          f"video, so frames cannot be padded)")
    enable_compilation_cache(job.compilation_cache)
    return resolve_dtype(job.dtype), mesh


@contextlib.contextmanager
def pipeline_errors() -> Iterator[None]:
    """The pipelines reject settings with ValueError, some only while tracing (a video longer
    than the motion module's position table): the user's settings, reported as such."""
    try:
        yield
    except USER_ERRORS:
        raise
    except ValueError as e:
        raise ConfigError(f"{' '.join(str(e).split())}; expected settings these models support "
                          f"(nothing written)") from None


def check_finite(frames: np.ndarray, **others: np.ndarray) -> None:
    bad = {name: int((~np.isfinite(x.reshape(len(x), -1))).any(1).sum())
           for name, x in {"": frames, **others}.items()}
    if any(bad.values()):
        counts = ", ".join([f"{bad.pop('')} of {len(frames)} frames",
                            *(f"{n} {name} frames" for name, n in bad.items())])
        raise OutputError(f"the result has NaN/inf values ({counts}; nothing written); expected "
                          f"finite frames: try dtype=float32 or check the weights")


def run_record(args: argparse.Namespace, job: Job, dtype: Any, mesh: Any, outputs: Outputs,
               frames: np.ndarray, inputs: dict[str, Any], timings: dict[str, float]
               ) -> dict[str, Any]:
    """The run's JSON record: resolved settings, inputs, outputs, runtime, timings, versions."""
    import jax

    return {
        "config": {**job.to_dict(), "dtype_resolved": np.dtype(dtype).name},
        "inputs": {**inputs, "demo": bool(args.demo)},
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


def write_outputs(outputs: Outputs, frames: np.ndarray, sheet: np.ndarray,
                  record: dict[str, Any], fps: float, progress: ConsoleProgress) -> None:
    """All three files or none; in a multi-host job, from process 0 only (every process holds
    the whole video)."""
    import jax

    if jax.process_index() != 0:
        progress.say(f"process {jax.process_index()}: done; process 0 writes the outputs")
        return
    try:
        vio.write_files_atomic([
            (outputs.video, lambda p: _quiet_fork(vio.write_video, p, frames, fps)),
            (outputs.sheet, lambda p: vio.write_png_atomic(p, sheet)),
            (outputs.record, lambda p: vio.write_json_atomic(p, record)),
        ])
    except OSError as e:  # a full disk or a folder removed mid-run: the run's fault, not ours
        raise OutputError(f"{outputs.video.parent}: could not write the outputs "
                          f"({type(e).__name__}: {e}; nothing kept); expected a writable folder "
                          f"with free space") from None
    progress.say(f"wrote {outputs.video} ({frames.shape[0]} frames, {frames.shape[1]}x"
                 f"{frames.shape[2]}), {outputs.sheet.name}, {outputs.record.name} in "
                 f"{record['timings']['total']:.1f}s")


def with_outputs(out: str, run: Callable[[Outputs], int]) -> int:
    """`run` with the checked outputs; folders made for them go again if it fails."""
    outputs = prepare_outputs(out)
    try:
        return run(outputs)
    except BaseException:
        outputs.remove_created_dirs()
        raise


def animate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    started = time.perf_counter()
    job = cfg.load_job(args.config, overrides, base=cfg.DEMO_CONFIG if args.demo else None,
                       flags=cli_generate.job_flags(args, AnimateJob))
    return with_outputs(args.out, lambda outputs: _run(args, job, outputs, started))


def _run(args: argparse.Namespace, job: AnimateJob, outputs: Outputs, started: float) -> int:
    progress = make_progress(args)
    reference, ref_in, box, out_hw, poses = _load_inputs(args, job, progress.say)
    settings = job.settings()
    # Everything above is cheap; models, compilation and the run come only after it passed.
    n = len(poses)
    dtype, mesh = start_runtime(job, n if job.motion_module else None, "the poses")
    models, load_s = cli_generate.load_timed(job, dtype, progress)
    if job.motion_module:
        check_motion_window(models.unet, n, "the poses", " (--frames N): animate has no "
                            "context windows")
    progress.say(f"animating {n} frames at {job.size_hw[0]}x{job.size_hw[1]} "
                 f"(each stage compiles on first use)")
    progress.t0 = time.perf_counter()
    with pipeline_errors():  # e.g. a scheduler whose timesteps cannot be inverted
        result = FreeAnimate(models, settings, mesh=mesh, progress=progress)(
            ref_in, poses, job.prompt)
    check_finite(result.frames, preview=result.preview)
    frames = crop_box(result.frames, box, out_hw)
    sheet = contact_sheet({
        "reference": crop_box(ref_in, box, out_hw),
        "pose": crop_box(poses, box, out_hw, kind="pose"),
        "preview": crop_box(result.preview, box, out_hw),
        "result": frames,
    }, rows=job.sheet_rows)
    timings = {"load_models": load_s, **result.timings,
               "total": time.perf_counter() - started}
    inputs = {"reference": args.reference or "demo", "poses": args.poses or "demo",
              "reference_hw": list(reference.shape[:2]), "frames": n}
    record = run_record(args, job, dtype, mesh, outputs, frames, inputs, timings)
    write_outputs(outputs, frames, sheet, record, job.fps, progress)
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
    command = cli_generate.generate if args.command == "generate" else animate
    try:
        return command(args, [*args.overrides, *extra])
    except USER_ERRORS as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
