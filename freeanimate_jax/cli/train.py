"""`freeanimate train`: train motion modules (or other chosen parts) on video.

    freeanimate train prepare-data --config RUNBOOK [key=value ...]   # data.manual_dir -> data.dir
    freeanimate train cache --config RUNBOOK --out CACHE [key=value ...]
    freeanimate train run --config RUNBOOK [--resume-from STEP] [key=value ...]
    freeanimate train run --demo          # tiny models, synthetic shapes, a few CPU minutes
    freeanimate train export --run DIR --out OUT [--layout diffusers|original] [--step N]

A run resumes by itself from the latest complete checkpoint in `train.output_dir`; SIGTERM
saves at the next step boundary and exits 0. Bad input is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from freeanimate_jax import config as cfg
from freeanimate_jax.cli.run import EXIT_BAD_INPUT, PROG, USER_ERRORS
from freeanimate_jax.config import TrainJob


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} train", description=__doc__.split("\n")[0],
                                     epilog="config keys: see configs/train_motion_v3.yaml")
    sub = parser.add_subparsers(dest="action", required=True,
                                metavar="{prepare-data,cache,run,export}")
    for name, text in (("prepare-data", "build the ArrayRecord dataset (tfds, offline)"),
                       ("cache", "encode every clip once (VAE posterior, CLIP embeddings)"),
                       ("run", "train; resumes from the latest checkpoint")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", metavar="FILE", help="YAML runbook (configs/train_*.yaml)")
        p.add_argument("--demo", action="store_true", help="the tiny runbook "
                       "(configs/train_motion_tiny.yaml): tiny models, synthetic data")
        if name == "cache":
            p.add_argument("--out", required=True, metavar="DIR", help="the cache folder "
                           "(then train with data.source=latents data.dir=DIR)")
        if name == "run":
            p.add_argument("--resume-from", type=int, metavar="STEP",
                           help="continue from this checkpoint instead of the latest")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    e = sub.add_parser("export", help="write what the run trained (a motion module: motion keys "
                       "only; a ControlNet or image UNet: a diffusers folder)")
    e.add_argument("--run", required=True, metavar="DIR", help="the run's train.output_dir")
    e.add_argument("--out", required=True, metavar="PATH", help="a folder (diffusers) or a "
                   ".safetensors file (original)")
    e.add_argument("--layout", choices=("diffusers", "original"), default="diffusers")
    e.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    e.add_argument("--ema", action="store_true", help="export the EMA weights")
    e.add_argument("--overwrite", action="store_true")
    return parser


def load(args: argparse.Namespace, overrides: Sequence[str]) -> TrainJob:
    return cfg.load_job(args.config, overrides, schema=TrainJob,
                        base=cfg.DEMO_TRAIN_CONFIG if args.demo else None)


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    from freeanimate_jax.data.errors import DataError
    from freeanimate_jax.train.loop import TrainError

    try:
        if args.action == "export":
            return export(args)
        job = load(args, [*args.overrides, *extra])
        return {"prepare-data": prepare_data, "cache": cache, "run": run}[args.action](args, job)
    except (*USER_ERRORS, DataError) as e:
        print(f"{PROG} train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainError as e:
        print(f"{PROG} train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} train: interrupted", file=sys.stderr)
        return 130


def prepare_data(args: argparse.Namespace, job: TrainJob) -> int:
    from freeanimate_jax.data.builder import prepare
    from freeanimate_jax.train.data import _builder_config

    data = job.sections()[0]
    if not data.dir:
        raise cfg.ConfigError("data.dir is empty; expected the folder to write the dataset to")
    storage = "frames" if data.source == "latents" else data.source
    builder = prepare(data.dir, storage, manual_dir=data.manual_dir or None,
                      size=job.size_hw[0], **_builder_config(job))
    rows = builder.info.splits["train"].num_examples
    skipped = len(getattr(builder, "skipped", []) or [])
    print(f"prepared {rows} videos ({storage}) at {builder.data_dir}"
          + (f"; {skipped} unreadable videos skipped" if skipped else ""))
    return 0


def _base(job: TrainJob) -> Any:
    from freeanimate_jax.cli.run import enable_compilation_cache, resolve_dtype
    from freeanimate_jax.train.loop import load_base

    enable_compilation_cache(job.compilation_cache)
    return load_base(job, resolve_dtype(job.dtype))


def cache(args: argparse.Namespace, job: TrainJob) -> int:
    from freeanimate_jax.train.cache import write_cache
    from freeanimate_jax.train.data import source_of

    data = job.sections()[0]
    if data.source == "latents":
        raise cfg.ConfigError("data.source=latents: the cache reads the prepared videos; "
                              "expected frames, bytes or synthetic")
    source = source_of(job)
    models = _base(job)
    meta = write_cache(source, args.out, models.vae, models.text_encoder, models.tokenizer,
                       size=job.size_hw[0], dtype="float32" if job.dtype == "float32"
                       else "bfloat16")
    print(f"cached {meta['count']} clips at {args.out} ({meta['dtype']}); train with "
          f"data.source=latents data.dir={args.out}")
    return 0


def run(args: argparse.Namespace, job: TrainJob) -> int:
    import jax

    from freeanimate_jax import parallel
    from freeanimate_jax.cli.run import enable_compilation_cache, join_hosts, resolve_dtype
    from freeanimate_jax.models.motion import position_limit
    from freeanimate_jax.train.data import open_data
    from freeanimate_jax.train.loop import Trainer, build_models
    from freeanimate_jax.train.metrics import run_folder
    from freeanimate_jax.train.validate import validate

    data_cfg, _, _, loop, val = job.sections()
    out = run_folder(loop.output_dir)
    join_hosts()
    mesh = parallel.data_mesh()
    data = open_data(job, mesh.size)
    enable_compilation_cache(job.compilation_cache)
    models = build_models(job, resolve_dtype(job.dtype))
    limit = position_limit(models.unet)
    for key, frames in (("data.frames", data_cfg.frames), ("val.frames", val.frames)):
        if limit is not None and frames > limit:
            raise cfg.ConfigError(f"{key}={frames} exceeds the motion module's position table "
                                  f"({limit}); expected at most {limit} frames")
    trainer = Trainer(job, models, data, mesh, compute_dtype=resolve_dtype(job.dtype),
                      log=lambda s: print(s, flush=True))
    hosts = f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
    print(f"training {loop.trainable!r} for {loop.max_steps} steps, global batch "
          f"{data.global_batch} on {mesh.size} device(s){hosts}, trained state "
          f"{'sharded over data' if trainer.sharded else 'replicated'}; output {out}",
          flush=True)
    result = trainer.run(args.resume_from, validate=validate if val.every else None)
    print(f"done: step {result['step']}, checkpoints in {out / 'checkpoints'}", flush=True)
    return 0


def export(args: argparse.Namespace) -> int:
    from freeanimate_jax.train.export import export_run

    path = export_run(args.run, args.out, layout=args.layout, step=args.step, ema=args.ema,
                      overwrite=args.overwrite)
    print(f"exported what the run trained ({args.layout} layout) to {path}")
    return 0
