"""`freeanimate toy`: the toy family, trained with `freeanimate train` on the toy world, and
packed into the package.

    freeanimate toy build --out runs/toy [STAGE:key=value ...]
    freeanimate toy pack --out runs/toy [--to DIR]
    freeanimate toy ablation --out runs/ablation [--model DIR] [--appearances 8 --seeds 3]

`build` makes a fresh family folder (`runs/toy/family`: random VAE and UNet, the tiny frozen
CLIP) and trains it in four stages, each a runbook of `configs/` run by `freeanimate train run`
and exported into the family: `vae` (configs/toy_vae.yaml), `unet` (toy_unet.yaml),
`controlnet` (toy_controlnet.yaml), `motion` (toy_motion.yaml). A stage that finished is
skipped; one that was stopped (Ctrl-C, SIGTERM, a lost machine) resumes from its last
checkpoint, so the whole recipe can run across several sittings (a stopped stage exits 75).
A stage's marker records its resolved job: other settings into the same --out are refused.
Overrides go to one stage (`unet:train.max_steps=100`) or to all (`all:train.max_steps=2`).

`pack` writes the trained family as fp16 safetensors into the package's `toy/weights` (at
most 8 MiB) with SHA256SUMS, which `builtin:toy` checks at every load.

`ablation` animates the held-out cases (appearances x {jumping jacks, wave} x seeds) with
every variant of the method (`eval/ablation.py`), scores them (`freeanimate eval`) and writes
table.md, table.json, the videos and one contact sheet per motion. A stopped ablation resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PROG = "freeanimate toy"
STAGES = ("vae", "unet", "controlnet", "motion")
# Where each stage's export lands in the family folder.
EXPORT_TO = {"vae": "vae", "unet": "unet", "controlnet": "controlnet",
             "motion": "motion_adapter"}
DONE = "EXPORTED.json"
STOPPED = 75  # a stage stopped before its last step (EX_TEMPFAIL): run the command again


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train the toy model family on the toy "
                                "world, stage by stage, and pack it into the package.")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="train every stage (resumes; finished stages skip)")
    b.add_argument("--out", default="runs/toy", metavar="DIR")
    b.add_argument("--configs", default=None, metavar="DIR", help="where the toy_*.yaml "
                   "runbooks are (default: the repository's configs/)")
    b.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    b.add_argument("overrides", nargs="*", metavar="STAGE:key=value")
    k = sub.add_parser("pack", help="the trained family -> fp16 safetensors + SHA256SUMS")
    k.add_argument("--out", default="runs/toy", metavar="DIR", help="the build folder")
    k.add_argument("--to", default=None, metavar="DIR", help="default: the package's "
                   "toy/weights")
    a = sub.add_parser("ablation", help="the held-out cases through every variant, scored")
    a.add_argument("--out", default="runs/ablation", metavar="DIR")
    a.add_argument("--model", default="builtin:toy", metavar="DIR", help="a toy family "
                   "folder (with controlnet/ and motion_adapter/); default: the shipped one")
    a.add_argument("--appearances", type=int, default=8)
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--frames", type=int, default=8)
    a.add_argument("--steps", type=int, default=6, help="DDIM steps (preview and final)")
    a.add_argument("--guidance", type=float, default=5.0)
    return p


def ablation(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from freeanimate_jax import config as cfg
    from freeanimate_jax.eval.ablation import run_ablation
    from freeanimate_jax.pipelines.settings import AnimateSettings
    from freeanimate_jax.toy.data import held_out_cases
    from freeanimate_jax.weights.assemble import load_models

    for name in ("appearances", "seeds", "frames", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}; expected at least 1")
    if args.model == cfg.TOY_MODEL:
        parts = {"model": cfg.TOY_MODEL, "controlnet": cfg.TOY_MODEL}
        motion = cfg.TOY_MODEL
    else:
        root = Path(args.model)
        parts = {"model": str(root), "controlnet": str(root / "controlnet")}
        motion = str(root / "motion_adapter")
    job = cfg.load_job(None, [], schema=cfg.AnimateJob, flags=parts)
    models = load_models(job, jnp.float32)
    video = load_models(dataclasses.replace(job, motion_module=motion), jnp.float32)
    settings = AnimateSettings(steps=args.steps, preview_steps=args.steps,
                               guidance_scale=args.guidance)
    cases = held_out_cases(args.appearances, seeds=tuple(range(args.seeds)),
                           frames=args.frames)
    run_ablation(args.out, models, video, settings, cases,
                 log=lambda s: print(s, flush=True), model=str(args.model))
    return 0


def _configs(folder: str | None) -> Path:
    path = Path(folder) if folder else Path(__file__).resolve().parents[2] / "configs"
    missing = [s for s in STAGES if not (path / f"toy_{s}.yaml").is_file()]
    if missing:
        raise ValueError(f"{path}: no toy_{missing[0]}.yaml; expected the repository's "
                         f"configs/ folder (or --configs DIR) with the toy runbooks")
    return path


def _overrides(items: Sequence[str], stage: str) -> list[str]:
    out = []
    for item in items:
        who, sep, kv = item.partition(":")
        if not sep or "=" not in kv or who not in (*STAGES, "all"):
            raise ValueError(f"override {item!r}; expected STAGE:key=value with STAGE one of "
                             f"{', '.join(STAGES)} or all")
        if who in (stage, "all"):
            out.append(kv)
    return out


def stage_overrides(out: Path, stage: str, extra: Sequence[str]) -> list[str]:
    family = out / "family"
    mine = [f"model={family}", f"train.output_dir={out / stage}"]
    return [*mine, *_overrides(extra, stage)]


def build(args: argparse.Namespace) -> int:
    from freeanimate_jax import config as cfg
    from freeanimate_jax.cli import train as train_cli
    from freeanimate_jax.io import write_json_atomic
    from freeanimate_jax.toy.family import init_family
    from freeanimate_jax.train.export import export_run

    out = Path(args.out).resolve()  # the runs record it: a later export works from anywhere
    configs = _configs(args.configs)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages {unknown[0]!r}; expected some of {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # always in the recipe's order
    for stage in stages:  # every runbook, override and prerequisite is checked before any work
        cfg.load_job(configs / f"toy_{stage}.yaml", stage_overrides(out, stage, args.overrides),
                     schema=cfg.TrainJob)
        missing = [s for s in STAGES[:STAGES.index(stage)]
                   if s not in stages and not (out / s / DONE).is_file()]
        if missing:
            raise ValueError(f"stage {stage} trains on the output of stage {missing[0]}, which "
                             f"is not done in {out}; expected --stages to include it first")
    if not (out / "family" / "model_index.json").is_file():
        stale = [s for s in STAGES if (out / s / DONE).is_file()]
        if stale:
            raise ValueError(f"{out}: stage {stale[0]} is marked done but the family folder is "
                             f"missing; expected a fresh --out (or the family it exported to)")
        init_family(out / "family")
        print(f"initialised a fresh toy family in {out / 'family'}", flush=True)
    for stage in stages:
        marker = out / stage / DONE
        config = configs / f"toy_{stage}.yaml"
        over = stage_overrides(out, stage, args.overrides)
        job = cfg.load_job(config, over, schema=cfg.TrainJob)
        digest = _job_digest(job)
        if marker.is_file():
            if json.loads(marker.read_text()).get("job") != digest:
                raise ValueError(f"{marker}: stage {stage} was exported with other settings; "
                                 f"expected the same runbook and overrides, or a fresh --out")
            print(f"[{stage}] done before ({marker}); skipped", flush=True)
            continue
        max_steps = job.sections()[3].max_steps
        print(f"[{stage}] {config.name}: training (resumes from its last checkpoint)",
              flush=True)
        t0 = time.perf_counter()
        status = train_cli.main(["run", "--config", str(config), *over])
        if status:
            return status
        step = _latest(out / stage)
        if step is None or step != max_steps:
            print(f"[{stage}] stopped at step {step or 0} of {max_steps}; run the same command "
                  f"to resume", flush=True)
            return STOPPED
        target = out / "family" / EXPORT_TO[stage]
        export_run(out / stage, target, overwrite=True,
                   ema=job.sections()[2].ema_decay is not None)
        write_json_atomic(marker, {"step": step, "exported_to": str(target), "job": digest,
                                   "ema": job.sections()[2].ema_decay is not None,
                                   "seconds_this_sitting": time.perf_counter() - t0})
        print(f"[{stage}] exported step {step} to {target}", flush=True)
    left = [s for s in STAGES if not (out / s / DONE).is_file()]
    if left:
        print(f"stages {', '.join(stages)} done; still to train: {', '.join(left)}", flush=True)
    else:
        print(f"the toy family is trained: {out / 'family'}; pack it with `{PROG} pack --out "
              f"{out}`", flush=True)
    return 0


def _job_digest(job) -> str:
    """What a stage's export depends on: its resolved job (runbook + overrides)."""
    import hashlib

    return hashlib.sha256(json.dumps(job.to_dict(), sort_keys=True, default=str).encode()
                          ).hexdigest()


def _latest(run: Path) -> int | None:
    from freeanimate_jax.train import checkpoint

    ckpt = checkpoint.Checkpoints(run / "checkpoints", keep=1000, asynchronous=False)
    try:
        return ckpt.latest()
    finally:
        ckpt.close()


def pack(args: argparse.Namespace) -> int:
    from freeanimate_jax.toy.family import SHIPPED, pack_family

    out = Path(args.out)
    missing = [s for s in STAGES if not (out / s / DONE).is_file()]
    if missing:
        raise ValueError(f"{out}: stage {missing[0]} is not finished; expected `{PROG} build "
                         f"--out {out}` to have exported every stage")
    target = Path(args.to) if args.to else SHIPPED
    total = pack_family(out / "family", target)
    print(f"packed the toy family into {target}: {total / 2**20:.2f} MiB (fp16)")
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from freeanimate_jax.cli.run import EXIT_BAD_INPUT, USER_ERRORS
    from freeanimate_jax.data.errors import DataError

    try:
        return {"build": build, "pack": pack, "ablation": ablation}[args.action](args)
    except (*USER_ERRORS, DataError, ValueError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
