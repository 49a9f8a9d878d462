"""`freeanimate generate`: AnimateDiff text-to-video from the command line, and the pieces of a
job both video commands share: their options and the model assembly.

    freeanimate generate --prompt TEXT --out OUT.mp4 [--model ID|DIR|FILE.safetensors]
        [--motion-module ID|DIR|FILE] [--motion-lora FILE[:SCALE]] [--domain-adapter FILE[:SCALE]]
        [--lora FILE[:SCALE]] [--controlnet ID|DIR --poses PATH] [--config FILE] [key=value ...]
    freeanimate generate --demo --out demo.mp4     # tiny built-in models, no download

Models: the SD 1.x family (a diffusers folder or hub id, or a single-file checkpoint), its
LoRAs merged, AnimateDiff v3's domain adapter merged into the UNet's spatial layers, and the
motion module (its motion LoRAs merged first) inserted into the UNet. `animate` assembles its
models the same way, so it takes a motion module too.

Outputs, errors, progress and the compilation cache behave as for `animate` (freeanimate_jax.cli):
bad input is one stderr line and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from freeanimate_jax import config as cfg
from freeanimate_jax.config import MOTION_EXPECTED, ConfigError, GenerateJob, Job
from freeanimate_jax.io import InputError, contact_sheet
from freeanimate_jax.pipelines.generate import Generate
from freeanimate_jax.pose import PoseError, demo_keypoints, load_poses, render_sequence
from freeanimate_jax.weights.convert import WeightsError
from freeanimate_jax.weights.motion import load_motion_module, merge_lora

if TYPE_CHECKING:
    from freeanimate_jax.cli import ConsoleProgress, Outputs


# -- options both commands share --------------------------------------------------------------
def config_epilog(schema: type[Job]) -> str:
    def names(cls: type) -> str:
        return ", ".join(f.name for f in dataclasses.fields(cls) if f.name != schema.SECTION)

    return (f"config keys: {names(schema)}; {schema.SECTION}.KEY for KEY in: "
            f"{names(schema.SETTINGS)}; scheduler.KEY for KEY in: {names(cfg.SchedulerOverrides)}")


def add_job_options(p: argparse.ArgumentParser, schema: type[Job], demo_help: str) -> None:
    """The options `animate` and `generate` share; each sets a config key (see config_epilog)."""
    p.add_argument("--prompt", metavar="TEXT", help="text prompt (config key prompt)")
    p.add_argument("--negative-prompt", metavar="TEXT",
                   help=f"negative prompt (config key {schema.SECTION}.negative_prompt)")
    p.add_argument("--config", metavar="FILE", help="YAML job file (see configs/)")
    p.add_argument("--demo", action="store_true", help=demo_help)
    p.add_argument("--model", metavar="ID|DIR|FILE", help="diffusers SD 1.5 folder or hub id, "
                   "or a single-file SD 1.x checkpoint (.safetensors)")
    p.add_argument("--motion-module", metavar="ID|DIR|FILE", help="AnimateDiff motion module: "
                   "diffusers MotionAdapter folder or hub id, or a released .ckpt/.safetensors")
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


def job_flags(args: argparse.Namespace, schema: type[Job]) -> dict[str, Any]:
    """The typed CLI options as a config layer (kept out of the dotlist: no YAML re-parsing)."""
    keys = ("model", "controlnet", "prompt", "frames", "motion_module", "motion_lora",
            "domain_adapter", "lora")
    flags = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.negative_prompt is not None:
        flags[schema.SECTION] = {"negative_prompt": args.negative_prompt}
    return flags


def add_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="prompt (+ poses) -> video with AnimateDiff",
                       description="Text-to-video with an SD 1.5 model and an AnimateDiff motion "
                       "module. Settings come from the defaults, --config FILE, the options "
                       "below and trailing key=value overrides (later wins), e.g. "
                       "generate.frames=24 generate.context_length=16.",
                       epilog=config_epilog(GenerateJob))
    g.add_argument("--controlnet", metavar="ID|DIR", help="optional per-frame ControlNet "
                   "(with --poses)")
    g.add_argument("--poses", metavar="PATH", help="control frames for --controlnet: OpenPose "
                   "JSON file/folder, skeleton image(s) or video (the first generate.frames)")
    add_job_options(g, GenerateJob, "built-in tiny models (SD family and motion module): no "
                    "download; 16 frames at 64x64")


# -- models ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def weights_errors(expected: str, what: str = "") -> Iterator[None]:
    """A WeightsError as one line, prefixed with `what`, ending in `; expected ...`."""
    try:
        yield
    except WeightsError as e:
        text = " ".join(str(e).split())
        tail = "" if "; expected" in text else f"; expected {expected}"
        raise WeightsError(f"{what + ': ' if what else ''}{text}{tail}") from None


def _load_base(job: Job, dtype: Any) -> Any:
    if job.model == cfg.TINY_MODEL:
        from freeanimate_jax.demo import tiny_models

        models = tiny_models(0, dtype=dtype)
        models.controlnet = models.controlnet if job.controlnet else None
        return models
    from freeanimate_jax.weights.pipeline import load_pipeline

    cache = job.weights_cache or None
    if not Path(job.model).expanduser().is_file():
        return load_pipeline(job.model, controlnet=job.controlnet or None, dtype=dtype,
                             cache_dir=cache)
    from freeanimate_jax.weights.loader import load
    from freeanimate_jax.weights.single_file import load_single_file

    models = load_single_file(job.model, dtype=dtype)
    if job.controlnet:
        models.controlnet = load(job.controlnet, dtype=dtype, cache_dir=cache)
        if (name := type(models.controlnet).__name__) != "ControlNetModel":
            raise WeightsError(f"{job.controlnet}: holds a {name}, not a ControlNetModel")
    return models


def _load_motion(job: Job, dtype: Any) -> Any:
    with weights_errors(MOTION_EXPECTED, "motion_module"):
        if job.motion_module == cfg.TINY_MODEL:
            from freeanimate_jax.demo import tiny_motion_adapter

            adapter = tiny_motion_adapter(dtype=dtype)
        else:
            adapter = load_motion_module(job.motion_module, dtype=dtype)
    for spec in job.motion_lora:
        path, scale = cfg.parse_weighted(spec)
        with weights_errors("a motion LoRA for this motion module", f"motion_lora {path}"):
            merge_lora(adapter, path, scale, target="motion")
    return adapter


def load_models(job: Job, dtype: Any) -> Any:
    """The job's models: the SD family (+ ControlNet) with its LoRAs and domain adapter merged,
    and with a motion module the UNet made a UNetMotionModel (motion LoRAs merged first)."""
    from freeanimate_jax.models.motion import UNetMotionModel
    from freeanimate_jax.weights import lora

    # Local files and the motion module first: a wrong one fails before SD's download.
    local = [("lora", s) for s in job.lora] + [("motion_lora", s) for s in job.motion_lora]
    if job.domain_adapter:
        local.append(("domain_adapter", job.domain_adapter))
    for key, spec in local:
        if not Path(path := cfg.parse_weighted(spec)[0]).expanduser().exists():
            raise WeightsError(f"{key}: {path}: no such file; expected a local LoRA file "
                               f"(download it first)")
    adapter = _load_motion(job, dtype) if job.motion_module else None
    with weights_errors("a diffusers SD 1.x folder or hub id, or a single-file SD 1.x "
                        "checkpoint (and a ControlNet folder or hub id)"):
        models = _load_base(job, dtype)
    if overrides := job.scheduler_overrides():  # validated with the job
        models.scheduler = dataclasses.replace(models.scheduler, **overrides)
    for spec in job.lora:
        with weights_errors("a LoRA for this Stable Diffusion 1.x model", "lora"):
            lora.merge_lora(models, *cfg.parse_weighted(spec))
    if job.domain_adapter:
        path, scale = cfg.parse_weighted(job.domain_adapter)
        with weights_errors("AnimateDiff v3's domain adapter (a spatial LoRA for SD 1.5)",
                            f"domain_adapter {path}"):
            merge_lora(models.unet, path, scale, target="spatial")
    if adapter is not None:
        try:
            models.unet = UNetMotionModel.from_unet2d(models.unet, adapter)
        except ValueError as e:
            raise WeightsError(f"motion_module {job.motion_module}: {e}; expected "
                               f"{MOTION_EXPECTED}") from None
    return models


def load_timed(job: Job, dtype: Any, progress: ConsoleProgress) -> tuple[Any, float]:
    """`load_models`, announced on `progress` and timed."""
    import jax

    progress.say(f"loading models ({job.model}) in {np.dtype(dtype).name} on "
                 f"{len(jax.devices())} {jax.default_backend()} device(s)")
    clock = time.perf_counter()
    models = load_models(job, dtype)
    return models, time.perf_counter() - clock


def check_motion_window(unet: Any, frames: int, what: str, remedy: str = "") -> None:
    """Fail before compiling: the UNet raises for frames beyond its position table only while
    tracing, minutes into a run."""
    from flax import nnx

    tables = {n.positions for _, n in nnx.iter_graph(unet) if getattr(n, "positions", None)}
    if tables and frames > (limit := min(tables)):
        raise ConfigError(f"{what}: {frames} frames exceed the motion module's position table "
                          f"({limit}); expected at most {limit} frames{remedy}")


# -- the command ----------------------------------------------------------------------------------
def generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from freeanimate_jax import cli  # it imports this module

    started = time.perf_counter()
    job = cfg.load_job(args.config, overrides, schema=GenerateJob,
                       base=cfg.DEMO_GENERATE_CONFIG if args.demo else None,
                       flags=job_flags(args, GenerateJob))
    return cli.with_outputs(args.out, lambda outputs: _run(args, job, outputs, started))


def _poses(args: argparse.Namespace, job: GenerateJob, frames: int) -> np.ndarray | None:
    """The control frames: the first `frames` of --poses (the demo's poses with --demo), or
    None without a ControlNet."""
    if not job.controlnet or (args.poses is None and not args.demo):
        if job.controlnet or args.poses is not None:
            raise InputError("--controlnet and --poses go together; expected both or neither "
                             "(config key controlnet)")
        return None
    if args.poses is None:
        return render_sequence(demo_keypoints(frames, job.size_hw), job.size_hw)
    poses = load_poses(args.poses, job.size_hw)
    if len(poses) < frames:
        raise PoseError(f"{args.poses}: {len(poses)} pose frames for generate.frames={frames}; "
                        f"expected at least one pose per frame")
    return poses[:frames]


def _run(args: argparse.Namespace, job: GenerateJob, outputs: Outputs, started: float) -> int:
    from freeanimate_jax import cli

    progress = cli.make_progress(args)
    if not job.prompt.strip():
        raise InputError("no prompt; expected --prompt TEXT (or the config key prompt)")
    settings = job.settings()
    poses = _poses(args, job, settings.frames)
    # Everything above is cheap; models, compilation and the run come only after it passed.
    dtype, mesh = cli.start_runtime(job, settings.frames, "generate.frames")
    models, load_s = load_timed(job, dtype, progress)
    if settings.context_length is None:
        check_motion_window(models.unet, settings.frames, "generate.frames",
                            ", or generate.context_length=16 for sliding context windows")
    else:
        check_motion_window(models.unet, min(settings.context_length, settings.frames),
                            "generate.context_length")
    progress.say(f"generating {settings.frames} frames at {job.size_hw[0]}x{job.size_hw[1]} "
                 f"(compiles on first use)")
    progress.t0 = time.perf_counter()
    with cli.pipeline_errors():  # incl. a trace-time "frames exceed the position table"
        result = Generate(models, settings, mesh=mesh, progress=progress)(
            job.prompt, job.size_hw, poses)
    frames = result.frames
    cli.check_finite(frames)
    sheet = contact_sheet({"pose": poses, "result": frames} if poses is not None
                          else {"result": frames}, rows=job.sheet_rows)
    denoise = result.timings.get("denoise", 0.0)
    timings = {"load_models": load_s, "denoise": denoise,
               "decode": result.timings.get("total", denoise) - denoise,
               "total": time.perf_counter() - started}
    inputs = {"prompt": job.prompt, "poses": args.poses or ("demo" if poses is not None else None),
              "frames": settings.frames}
    record = cli.run_record(args, job, dtype, mesh, outputs, frames, inputs, timings)
    cli.write_outputs(outputs, frames, sheet, record, job.fps, progress)
    return 0
