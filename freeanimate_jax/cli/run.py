"""What every `freeanimate` command that writes a video shares: its options, the output checks
and atomic writes, the runtime (mesh, dtype, compilation cache), progress, one-line errors, the
run record, and the run skeleton itself (`run_video`).

Bad input is one line on stderr (`freeanimate: error: ...; expected ...`) and exit status 2,
found before any model is loaded or compiled where it can be; nothing is written unless the
whole run succeeds. Genuine bugs still raise with a traceback. JAX is imported only once a run
starts, not for argument errors or `--help`.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from freeanimate_jax import config as cfg
from freeanimate_jax.config import ConfigError, Job
from freeanimate_jax.io import InputError, contact_sheet
from freeanimate_jax.io import video as vio
from freeanimate_jax.pipelines.progress import Progress
from freeanimate_jax.pose import PoseError
from freeanimate_jax.weights import assemble
from freeanimate_jax.weights.errors import WeightsError

PROG = "freeanimate"
OUT_SUFFIXES = (".mp4", ".gif", ".npz")
EXIT_BAD_INPUT = 2


class OutputError(ValueError):
    """The output cannot be written, or the run produced nothing worth writing."""


USER_ERRORS = (ConfigError, PoseError, InputError, WeightsError, OutputError)
# Stage timings keep the names run records have always used.
RECORD_NAMES = {"text encoder": "text", "VAE encode": "encode", "VAE decode": "decode"}


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


# -- options both video commands share ----------------------------------------------------------
def config_epilog(schema: type[Job]) -> str:
    def names(cls: type) -> str:
        return ", ".join(f.name for f in dataclasses.fields(cls) if f.name != schema.SECTION)

    return (f"config keys: {names(schema)}; {schema.SECTION}.KEY for KEY in: "
            f"{names(schema.SETTINGS)}; scheduler.KEY for KEY in: {names(cfg.SchedulerOverrides)}")


# The sampling flags diffusers and AnimateDiff users know, the same on both commands:
# (option strings, dest, type, metavar, help, config key; "S." = the command's settings section).
SAMPLING_FLAGS = (
    (("--steps", "--num-inference-steps"), "steps", int, "N", "denoising steps", "S.steps"),
    (("--guidance-scale",), "guidance_scale", float, "G", "classifier-free guidance scale",
     "S.guidance_scale"),
    (("--seed",), "seed", int, "N", "random seed (noise, and eta/ancestral noise)", "S.seed"),
    (("--negative-prompt",), "negative_prompt", str, "TEXT", "negative prompt",
     "S.negative_prompt"),
    (("--controlnet-scale",), "controlnet_scale", float, "X",
     "ControlNet conditioning scale", "S.controlnet_scale"),
    (("--scheduler",), "scheduler", str, "NAME", "sampler: ddim, euler, euler_karras, "
     "euler_ancestral, dpmpp_2m, dpmpp_2m_karras, lcm (or diffusers' class name); animate "
     "keeps DDIM",
     "S.scheduler"),
    (("--size",), "size", int, "PX", "model resolution, square (multiple of 8)", "size"),
    (("--width",), "width", int, "PX", "model width (with --height)", None),
    (("--height",), "height", int, "PX", "model height (with --width)", None),
    (("--fps",), "fps", float, "FPS", "frames per second of the video", "fps"),
)
# Options that set top-level config keys of the same name.
TOP_LEVEL = ("model", "controlnet", "prompt", "frames", "motion_module", "motion_lora",
             "domain_adapter", "lora", "fps", "size")
SWITCHES = ("--demo", "--quiet", "--detect", "-h", "--help")  # options without a value


def _default_text(schema: type[Job], key: str | None) -> str:
    if key is None:
        return ""
    if key.startswith("S."):
        field = next(f for f in dataclasses.fields(schema.SETTINGS) if f.name == key[2:])
    else:
        field = next(f for f in dataclasses.fields(schema) if f.name == key)
    value = field.default
    return "" if value in ("", None) else f" (default: {value})"


def add_job_options(p: argparse.ArgumentParser, schema: type[Job], demo_help: str) -> None:
    """The options `animate` and `generate` share; each sets a config key (see config_epilog).
    A flag and a key=value override of the same key: the later on the command line wins."""
    model_default = next(f.default for f in dataclasses.fields(schema) if f.name == "model")
    motion_default = next(f.default for f in dataclasses.fields(schema)
                          if f.name == "motion_module")
    p.add_argument("--prompt", metavar="TEXT", help="text prompt (config key prompt)")
    for names, dest, tp, metavar, text, key in SAMPLING_FLAGS:
        where = "" if key is None else f"; config key {key.replace('S.', schema.SECTION + '.')}"
        p.add_argument(*names, dest=dest, type=tp, metavar=metavar,
                       help=f"{text}{_default_text(schema, key)}{where}")
    frames_key = "generate.frames" if schema.SECTION == "generate" else "frames"
    frames_default = " (default: 16)" if schema.SECTION == "generate" else " (default: all)"
    p.add_argument("--num-frames", dest="num_frames", type=int, metavar="N",
                   help=f"frames of the video{frames_default}; config key {frames_key}")
    p.add_argument("--config", metavar="FILE", help="YAML job file (see configs/)")
    p.add_argument("--demo", action="store_true", help=demo_help)
    p.add_argument("--model", metavar="ID|DIR|FILE", help="diffusers SD 1.5 folder or hub id, "
                   f"or a single-file SD 1.x checkpoint (.safetensors) (default: {model_default})")
    motion = f" (default: {motion_default})" if motion_default else " (default: none)"
    p.add_argument("--motion-module", metavar="ID|DIR|FILE", help="AnimateDiff motion module: "
                   "diffusers MotionAdapter folder or hub id, or a released .ckpt/.safetensors"
                   + motion)
    p.add_argument("--motion-lora", metavar="FILE[:SCALE]", action="append",
                   help="motion LoRA merged into the motion module (repeatable)")
    p.add_argument("--domain-adapter", metavar="FILE[:SCALE]",
                   help="AnimateDiff v3 domain adapter (a LoRA on the UNet's spatial layers)")
    p.add_argument("--lora", metavar="FILE[:SCALE]", action="append",
                   help="Stable Diffusion LoRA merged into the UNet/text encoder (repeatable)")
    p.add_argument("--out", required=True, metavar="OUT.(mp4|gif|npz)", help="the video; "
                   "OUT.sheet.png and OUT.json are written next to it")
    p.add_argument("--quiet", action="store_true", help="no progress or summary on stdout. "
                   "The step display appears only on a terminal: JAX does not persist programs "
                   "that call back to the host, so runs from scripts keep every stage in the "
                   "compilation cache")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _flag_layer(dest: str, value: Any, schema: type[Job]) -> dict[str, Any]:
    section = schema.SECTION
    if dest == "num_frames":
        return {section: {"frames": value}} if section == "generate" else {"frames": value}
    key = next((k for _, d, _, _, _, k in SAMPLING_FLAGS if d == dest), None)
    if key is not None and key.startswith("S."):
        return {section: {key[2:]: value}}
    return {dest: value}


def job_items(args: argparse.Namespace, schema: type[Job], overrides: Sequence[str] = ()
              ) -> list[tuple[str, Any]]:
    """The command line's config layers in their order (`args.argv`): ("flag", mapping) for
    each option that sets a config key, ("override", "key=value") for each of `overrides`; the
    later wins."""
    position: dict[str, int] = {}
    spots: dict[str, list[int]] = {}  # where each key=value token sits
    argv = list(getattr(args, "argv", None) or [])
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and token not in SWITCHES:
            name, eq, _ = token.partition("=")
            position[name[2:].replace("-", "_")] = i
            i += 1 if eq else 2
            continue
        spots.setdefault(token, []).append(i)
        i += 1
    placed = [(spots[o].pop(0) if spots.get(o) else len(argv) + k, o)
              for k, o in enumerate(overrides)]
    if "num_inference_steps" in position:  # two spellings of one flag: the later counts
        position["steps"] = max(position.pop("num_inference_steps"), position.get("steps", -1))
    width, height = getattr(args, "width", None), getattr(args, "height", None)
    if (width is None) != (height is None):
        raise ConfigError("--width and --height go together; expected both (or --size PX)")
    flags: list[tuple[int, dict[str, Any]]] = []
    if width is not None:
        at = max(position.get("width", -1), position.get("height", -1))
        flags.append((at, {"size": [height, width]}))
    dests = [d for _, d, _, _, _, k in SAMPLING_FLAGS if k is not None]
    for dest in dict.fromkeys([*dests, *TOP_LEVEL, "num_frames"]):
        value = getattr(args, dest, None)
        if value is not None:
            flags.append((position.get(dest, -1), _flag_layer(dest, value, schema)))
    ordered = sorted([(at, ("flag", layer)) for at, layer in flags]
                     + [(at, ("override", item)) for at, item in placed],
                     key=lambda x: x[0])
    return [item for _, item in ordered]


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


def join_hosts() -> None:
    """Join the multi-host job when FREEANIMATE_DISTRIBUTED=1 (run_tpu.sh sets it on every
    host); before anything touches a device."""
    from freeanimate_jax import parallel

    if os.environ.get("FREEANIMATE_DISTRIBUTED") == "1":
        try:
            parallel.initialize_distributed()
        except ValueError as e:
            raise ConfigError(f"FREEANIMATE_DISTRIBUTED=1: {e}") from None


def start_runtime(job: Job, frames: int | None = None, what: str = "") -> tuple[Any, Any]:
    """Compilation cache, dtype and a frame mesh over all devices (when more than one).
    `frames`: a video that must divide over the mesh (a motion module sees every frame, so
    padding would change the video)."""
    import jax

    from freeanimate_jax import parallel

    join_hosts()
    mesh = parallel.make_mesh() if len(jax.devices()) > 1 else None
    if frames is not None:
        try:
            parallel.check_frames(frames, mesh, what)
        except ValueError as e:
            raise ConfigError(str(e)) from None
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
        # Where each config key came from: default, demo, runbook, flag or override.
        "config_sources": dict(getattr(args, "sources", None) or {}),
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
            (outputs.video, lambda p: vio.write_video(p, frames, fps)),
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


def load_timed(job: Job, dtype: Any, progress: ConsoleProgress) -> tuple[Any, float]:
    """`load_models`, announced on `progress` and timed."""
    import jax

    progress.say(f"loading models ({job.model}) in {np.dtype(dtype).name} on "
                 f"{len(jax.devices())} {jax.default_backend()} device(s)")
    clock = time.perf_counter()
    models = assemble.load_models(job, dtype)
    return models, time.perf_counter() - clock


def check_motion_window(unet: Any, frames: int, what: str, remedy: str = "") -> None:
    """Fail before compiling: the UNet raises for frames beyond its position table only while
    tracing, minutes into a run."""
    from freeanimate_jax.models.motion import position_limit

    limit = position_limit(unet)
    if limit is not None and frames > limit:
        raise ConfigError(f"{what}: {frames} frames exceed the motion module's position table "
                          f"({limit}); expected at most {limit} frames{remedy}")


@dataclasses.dataclass
class Sampled:
    """What a command's sampling gives the shared run: the frames to write, the contact sheet's
    columns, per-stage timings, and other frames that must be finite too."""

    frames: np.ndarray
    sheet: dict[str, np.ndarray]
    timings: dict[str, float]
    also_finite: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class VideoRun:
    """One video command's part of `run_video`, prepared from cheap inputs only.

    frames: the video length; `divide`: it must divide over the devices (a motion module sees
    every frame, so frames cannot be padded), named `what` in errors. `check(models)`: checks
    once the models are loaded, before compiling; `sample(models, mesh, progress)`: the run.
    """

    frames: int
    divide: bool
    what: str
    announce: str
    inputs: dict[str, Any]
    check: Callable[[Any], None]
    sample: Callable[[Any, Any, ConsoleProgress], Sampled]


def run_video(args: argparse.Namespace, job: Job, outputs: Outputs, started: float,
              prepare: Callable[[ConsoleProgress], VideoRun]) -> int:
    """The skeleton of every video command: cheap inputs first, then the runtime, the models,
    the sampling, and all outputs or none."""
    progress = make_progress(args)
    video = prepare(progress)
    # Everything above is cheap; models, compilation and the run come only after it passed.
    dtype, mesh = start_runtime(job, video.frames if video.divide else None, video.what)
    models, load_s = load_timed(job, dtype, progress)
    video.check(models)
    progress.say(video.announce)
    progress.t0 = time.perf_counter()
    with pipeline_errors():  # incl. what the pipeline only finds while tracing
        result = video.sample(models, mesh, progress)
    check_finite(result.frames, **result.also_finite)
    sheet = contact_sheet(result.sheet, rows=job.sheet_rows)
    stages = {RECORD_NAMES.get(k, k): v for k, v in result.timings.items()}
    timings = {"load_models": load_s, **stages, "total": time.perf_counter() - started}
    record = run_record(args, job, dtype, mesh, outputs, result.frames, video.inputs, timings)
    write_outputs(outputs, result.frames, sheet, record, job.fps, progress)
    return 0
