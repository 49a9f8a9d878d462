"""FreeAnimate benchmark: per-stage wall time of a full run (first call vs warm call), and one
UNet+ControlNet evaluation, ours (JAX, jitted) against diffusers (PyTorch) with the same weights.

    python benchmarks/animate.py --config tiny              # CPU, seconds
    python benchmarks/animate.py --config mid               # CPU, minutes
    python benchmarks/animate.py --config sd15 --device gpu # GPU, bf16, with MFU

Weights are random (drawn by our initialisers) and copied into diffusers' models through
`export_state_dict` + `load_state_dict(strict=True)`, so both sides compute the same function;
the table reports how far apart their outputs are as a check. Inputs are random: the timings
do not depend on the pictures. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from freeanimate_jax.demo import TINY_CONFIGS, TINY_SIZE, tiny_tokenizer
from freeanimate_jax.diffusion.ddim import SchedulerConfig
from freeanimate_jax.models import known_configs as kc
from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate
from freeanimate_jax.pipelines.common import Pure
from freeanimate_jax.pipelines.core import until_flags
from freeanimate_jax.weights.convert import export_state_dict
from freeanimate_jax.weights.loader import build
from freeanimate_jax.weights.pipeline import SDPipelineModels

PROMPT = "a person dancing"
TIMESTEP = 500  # any one step: the cost of an evaluation does not depend on it
CONTEXT_TOKENS = 77  # CLIP's padded prompt length, what the pipeline feeds the UNet

# The mid family: SD1.5's architecture (4 levels, 2 layers per block, the same block types,
# 8 heads, the openpose ControlNet's condition embedding) at a fifth of its width, so a CPU
# runs a full FreeAnimate job at 256x256 in minutes while every code path stays the real one.
_MID_BLOCKS = dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2,
                   attention_head_dim=8, cross_attention_dim=256, norm_num_groups=32)
MID_CONFIGS = {
    "unet": {**kc.SD15_UNET, **_MID_BLOCKS},
    "controlnet": {**kc.OPENPOSE_CONTROLNET, **_MID_BLOCKS},
    "vae": {**kc.SD15_VAE, "block_out_channels": [32, 64, 128, 128]},
    # vocab_size 514: the byte-level tokenizer every family here uses (no download).
    "text_encoder": {**kc.SD15_TEXT_ENCODER, "hidden_size": 256, "intermediate_size": 1024,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 514},
}
SD15_CONFIGS = {"unet": kc.SD15_UNET, "controlnet": kc.OPENPOSE_CONTROLNET,
                "vae": kc.SD15_VAE, "text_encoder": kc.SD15_TEXT_ENCODER}


@dataclasses.dataclass(frozen=True)
class Family:
    configs: dict[str, dict]  # unet, controlnet, vae, text_encoder (diffusers/transformers)
    size: int  # pixels, square
    frames: int
    steps: int
    # FLOPs of one UNet + one ControlNet evaluation per image, where a published figure exists
    # (SD1.5 at 512x512: 0.80e12 UNet + 0.28e12 ControlNet); None: MFU is not reported.
    flops_per_image: float | None = None


FAMILIES = {
    "tiny": Family(TINY_CONFIGS, TINY_SIZE, frames=16, steps=6),
    "mid": Family(MID_CONFIGS, 256, frames=4, steps=4),
    "sd15": Family(SD15_CONFIGS, 512, frames=16, steps=25, flops_per_image=0.80e12 + 0.28e12),
}

# Peak dense bf16 FLOP/s (NVIDIA datasheets: the "with sparsity" figure halved). The first
# name contained in the device name wins, so the specific variants come first.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0}

STAGES = ("text encoder", "VAE encode", "reference inversion", "preview reference inversion",
          "preview start", "preview", "preview inversion", "denoise", "VAE decode",
          "preview decode")


def log(msg: str) -> None:
    # Progress goes to stderr so stdout carries only the Markdown table.
    print(msg, file=sys.stderr, flush=True)


# -- evaluation counts -------------------------------------------------------------------------

def count_evals(s: AnimateSettings) -> dict[str, dict[str, int]]:
    """Model evaluations per stage of one FreeAnimate call, from its settings (mirrors
    `pipelines/animate.py`): `unet_cn` are UNet+ControlNet evaluations over all frames,
    `unet_only` UNet evaluations of the reference latent (batch 1)."""
    steps, preview = s.steps, s.preview_steps
    branches = 2 if s.cfg else 1  # classifier-free guidance: cond + uncond
    # `recompute` reruns the preview branch at the steps where IBA is on (a lax.cond, so only
    # those steps pay); with no IBA layer the rerun captures nothing and XLA drops it.
    reruns = int(until_flags(steps, s.iba_until).sum()) \
        if s.cache_mode == "recompute" and s.iba_layers else 0
    return {
        "reference inversion": {"unet_cn": 0, "unet_only": steps},
        # A preview schedule of its own needs its own reference inversion.
        "preview reference inversion": {"unet_cn": 0, "unet_only": 0 if preview == steps
                                        else preview},
        "preview": {"unet_cn": preview * branches, "unet_only": 0},
        "preview inversion": {"unet_cn": steps, "unet_only": 0},
        "denoise": {"unet_cn": steps * branches + reruns, "unet_only": 0},
    }


# -- models --------------------------------------------------------------------------------------

def make_models(family: Family, dtype, seed: int = 0) -> SDPipelineModels:
    """Random-weight models of `family` (seeded like `demo.tiny_models`: seed + index)."""
    made = {name: build(cfg, param_dtype=dtype, seed=seed + i)
            for i, (name, cfg) in enumerate(family.configs.items())}
    return SDPipelineModels(unet=made["unet"], vae=made["vae"],
                            text_encoder=made["text_encoder"], tokenizer=tiny_tokenizer(),
                            scheduler=SchedulerConfig.from_dict(kc.SD15_SCHEDULER),
                            controlnet=made["controlnet"])


def torch_twin(model, cls, device: str, dtype) -> Any:
    """The diffusers model with our weights: same config, `load_state_dict(strict=True)`."""
    import torch

    ref = cls.from_config(dict(model.config))
    # Through float32: numpy has no native bfloat16 that torch reads; bf16 -> f32 -> bf16 is
    # exact, so the bf16 twin holds the same values as ours.
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
             export_state_dict(model).items()}
    ref.load_state_dict(state, strict=True)
    ref = ref.to(device)
    # diffusers warns on every dtype cast through `.to`; float32 needs none.
    return (ref if dtype == torch.float32 else ref.to(dtype)).eval()


# -- timing --------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int,
               repeats: int) -> dict[str, float]:
    """First call (compilation, for JAX), `warmup - 1` more untimed, then `repeats` timed."""
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "repeats": repeats}


def xla_flops(lowered) -> float | None:
    """XLA's own FLOP count of a lowered computation (None where the backend gives none)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # not every jax version / backend implements it: the figure is optional
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def bench_eval(models: SDPipelineModels, family: Family, batch: int, *, gpu: bool, dtype_name: str,
               warmup: int, repeats: int, diffusers: bool) -> dict[str, Any]:
    """One ControlNet call + one UNet call with its residuals, batch = frames: ours vs diffusers.

    CPU and GPU share this code; `gpu` only picks torch's device and its synchronisation."""
    latent, cross = family.size // 8, family.configs["unet"]["cross_attention_dim"]
    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, latent, latent, 4), np.float32)
    ctx = rng.standard_normal((batch, CONTEXT_TOKENS, cross), np.float32)
    cond = rng.random((batch, family.size, family.size, 3), np.float32)  # pose image in [0, 1]
    jdtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32

    unet, cn = Pure.of(models.unet), Pure.of(models.controlnet)

    @jax.jit
    def step(unet_state, cn_state, z, t, ctx, cond):
        down, mid = cn.bind(cn_state)(z, t, ctx, cond)
        return unet.bind(unet_state)(z, t, ctx, down, mid)

    args = (unet.state, cn.state, jnp.asarray(z, jdtype), jnp.asarray(TIMESTEP),
            jnp.asarray(ctx, jdtype), jnp.asarray(cond, jdtype))
    log(f"eval: ours (JAX), batch {batch}, {latent}x{latent} latents")
    ours = time_calls(lambda: step(*args), jax.block_until_ready, warmup, repeats)
    out: dict[str, Any] = {"batch": batch, "latent": latent, "ours": ours,
                           "xla_flops_per_image": None}
    flops = xla_flops(step.lower(*args))
    if flops is not None:
        out["xla_flops_per_image"] = flops / batch
    if diffusers:
        out.update(_bench_diffusers(models, z, ctx, cond, np.asarray(step(*args), np.float32),
                                    gpu=gpu, dtype_name=dtype_name, warmup=warmup,
                                    repeats=repeats))
        if gpu:  # the torch models are gone: hand their memory back before the full run
            import torch

            torch.cuda.empty_cache()
    return out


def _bench_diffusers(models: SDPipelineModels, z, ctx, cond, ours_out: np.ndarray, *, gpu: bool,
                     dtype_name: str, warmup: int, repeats: int) -> dict[str, Any]:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    device = "cuda" if gpu else "cpu"
    tdtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    log("eval: diffusers (PyTorch): copying the weights")
    unet = torch_twin(models.unet, UNet2DConditionModel, device, tdtype)
    cn = torch_twin(models.controlnet, ControlNetModel, device, tdtype)

    def nchw(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device, tdtype)

    zt, condt = nchw(z), nchw(cond)
    ctxt = torch.from_numpy(ctx).to(device, tdtype)
    t = torch.tensor(TIMESTEP, device=device)

    def call():
        down, mid = cn(zt, t, ctxt, condt, conditioning_scale=1.0, return_dict=False)
        return unet(zt, t, ctxt, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]

    def sync(x):
        if gpu:
            torch.cuda.synchronize()
        return x

    log(f"eval: diffusers (PyTorch), {torch.get_num_threads()} threads")
    with torch.no_grad():  # what diffusers' pipelines run under
        ref = time_calls(call, sync, warmup, repeats)
        ref_out = call().float().cpu().numpy().transpose(0, 2, 3, 1)
    scale = max(1.0, float(np.max(np.abs(ref_out))))
    result = {"diffusers": ref, "max_rel_diff": float(np.max(np.abs(ours_out - ref_out))) / scale,
              "attn_processor": type(next(iter(unet.attn_processors.values()))).__name__}
    return result


def bench_pipeline(models: SDPipelineModels, settings: AnimateSettings, size: int,
                   frames: int) -> dict[str, Any]:
    """Two calls on one FreeAnimate object with the same shapes: the first compiles."""
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    animate = FreeAnimate(models, settings)
    runs = []
    for name in ("first", "warm"):
        log(f"pipeline: {name} call")
        t0 = time.perf_counter()
        result = animate(reference, poses, PROMPT)
        total = time.perf_counter() - t0
        if not np.isfinite(result.frames).all():
            raise RuntimeError("the pipeline produced non-finite frames")
        runs.append({"stages": dict(result.timings), "total_s": total})
    return {"first": runs[0], "warm": runs[1]}


# -- machine and report --------------------------------------------------------------------------

def machine_info(gpu: bool) -> dict[str, Any]:
    import diffusers
    import flax
    import torch

    cpu_model = None
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "processor": platform.processor() or platform.machine(), "nproc": nproc,
        "cpu_model": cpu_model,
        # Other work on the machine skews CPU timings: the load at the start says how much.
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax_device": jax.devices()[0].device_kind, "jax_backend": jax.default_backend(),
        "torch_device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "jax_compilation_cache": bool(jax.config.jax_compilation_cache_dir),
    }
    if gpu:
        info["torch_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["torch_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["run"]
    lines = [f"## FreeAnimate benchmark: `{r['config']}` ({m['jax_backend']}, {r['dtype']})", "",
             "| | |", "|---|---|",
             f"| command | `{report['command']}` |",
             f"| date | {report['date']} |",
             f"| machine | {m['processor']}, {m['nproc']} CPUs, {m['cpu_model'] or 'unknown CPU'}"
             f", load average {_fmt(m['loadavg'], 2)} at start |",
             f"| devices | JAX: {m['jax_device']}; torch: {m['torch_device']} "
             f"({m['torch_threads']} threads) |",
             "| versions | " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + " |",
             f"| run | {r['size']}x{r['size']} px, {r['frames']} frames, {r['steps']} steps "
             f"(preview {r['preview_steps']}), guidance {r['guidance_scale']}, "
             f"cache `{r['cache_mode']}` |"]
    if m.get("jax_compilation_cache"):
        lines.append("| note | JAX persistent compilation cache on: first calls may not compile |")
    evals = report["evals"]
    if "pipeline" in report:
        p = report["pipeline"]
        lines += ["", "### Full run, per stage (wall seconds)", "",
                  "| stage | first call | warm call | UNet+ControlNet evals (batch = frames) "
                  "| UNet-only evals (batch 1) |",
                  "|---|---:|---:|---:|---:|"]
        for stage in STAGES:
            n = evals.get(stage, {"unet_cn": 0, "unet_only": 0})
            lines.append(f"| {stage} | {_fmt(p['first']['stages'].get(stage))} "
                         f"| {_fmt(p['warm']['stages'].get(stage))} | {n['unet_cn']} "
                         f"| {n['unet_only']} |")
        rest = {k: p[k]["total_s"] - sum(p[k]["stages"].values()) for k in ("first", "warm")}
        lines.append(f"| other (preview decode, host copies) | {_fmt(rest['first'])} "
                     f"| {_fmt(rest['warm'])} | | |")
        total = {k: sum(v[k] for v in evals.values()) for k in ("unet_cn", "unet_only")}
        lines.append(f"| **total** | **{_fmt(p['first']['total_s'])}** "
                     f"| **{_fmt(p['warm']['total_s'])}** | {total['unet_cn']} "
                     f"| {total['unet_only']} |")
    if "eval" in report:
        e = report["eval"]
        lines += ["", f"### One UNet+ControlNet evaluation (batch {e['batch']}, "
                      f"{e['latent']}x{e['latent']} latents)", "",
                  "| | ours (JAX, jit) | diffusers (PyTorch) | diffusers / ours |",
                  "|---|---:|---:|---:|"]
        ours, ref = e["ours"], e.get("diffusers")
        ratio = ref["median_s"] / ours["median_s"] if ref else None
        lines.append(f"| median of {ours['repeats']} (s) | {_fmt(ours['median_s'], 4)} "
                     f"| {_fmt(ref and ref['median_s'], 4)} | **{_fmt(ratio, 2)}** |")
        lines.append(f"| min (s) | {_fmt(ours['min_s'], 4)} | {_fmt(ref and ref['min_s'], 4)} "
                     f"| |")
        lines.append(f"| first call (s; ours compiles) | {_fmt(ours['first_s'], 3)} "
                     f"| {_fmt(ref and ref['first_s'], 3)} | |")
        if e.get("mfu_ours") is not None:
            mfu_ref = e.get("mfu_diffusers")
            lines.append(f"| MFU (peak {e['peak_tflops']:.0f} TFLOP/s) | {e['mfu_ours']:.1%} "
                         f"| {'-' if mfu_ref is None else f'{mfu_ref:.1%}'} | |")
        if "pipeline" in report:
            n = total["unet_cn"]
            lines.append(f"| x {n} evals of a full run (s) | {_fmt(n * ours['median_s'], 2)} "
                         f"| {_fmt(ref and n * ref['median_s'], 2)} | |")
        lines.append("")
        notes = [">1 means ours is faster."]
        if ref:
            notes.append(f"Outputs agree to {e['max_rel_diff']:.1e} (max abs difference over "
                         f"max(1, max |diffusers|)); diffusers attention: "
                         f"`{e['attn_processor']}`.")
        if e.get("xla_flops_per_image"):
            notes.append(f"XLA counts {e['xla_flops_per_image'] / 1e9:.1f} GFLOP per image per "
                         f"evaluation.")
        if e.get("flops_per_image"):
            notes.append(f"MFU uses {e['flops_per_image'] / 1e12:.2f} TFLOP per image "
                         f"(SD1.5 UNet 0.80 + ControlNet 0.28 at 512x512).")
        lines.append(" ".join(notes))
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(FAMILIES),
                    help="model family and default sizes (default: tiny on cpu, sd15 on gpu)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="weights and activations, both sides (default: float32 on cpu, "
                         "bfloat16 on gpu)")
    ap.add_argument("--frames", type=int, help="frames (the evaluation batch)")
    ap.add_argument("--steps", type=int, help="denoising / inversion steps")
    ap.add_argument("--preview-steps", type=int, help="preview steps (default: --steps)")
    ap.add_argument("--cache-mode", choices=("hidden", "maps", "recompute"), default="hidden")
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed evaluations, first included")
    ap.add_argument("--repeats", type=int, default=5, help="timed evaluations (median reported)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the evaluation timing")
    ap.add_argument("--skip-eval", action="store_true", help="only the full-run timing")
    ap.add_argument("--skip-diffusers", action="store_true", help="time ours only")
    ap.add_argument("--peak-tflops", type=float,
                    help="peak dense FLOP/s (in TFLOP/s) for MFU (default: from the GPU name: "
                         + ", ".join(f"{k} {v:.0f}" for k, v in PEAK_TFLOPS.items()) + ")")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--json", type=Path, help="write the raw numbers as JSON here")
    args = ap.parse_args(argv)
    args.config = args.config or ("sd15" if args.device == "gpu" else "tiny")
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    if args.skip_pipeline and args.skip_eval:
        ap.error("--skip-pipeline and --skip-eval leave nothing to measure")
    for name in ("repeats", "warmup", "frames", "steps", "preview_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def select_device(device: str) -> bool:
    """Point JAX at the device before anything touches a backend; True for a GPU run."""
    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        return False
    # Grow on demand rather than take 75% up front: diffusers shares the GPU in this process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # CPU stays available as a second backend for anything that asks for host arrays.
    jax.config.update("jax_platforms", "cuda,cpu")
    import torch

    try:
        has_jax_gpu = jax.devices()[0].platform == "gpu"
    except RuntimeError:
        has_jax_gpu = False
    if not has_jax_gpu or not torch.cuda.is_available():
        raise SystemExit(f"--device gpu: JAX sees a GPU: {has_jax_gpu}, torch sees one: "
                         f"{torch.cuda.is_available()} (install jax[cuda12] and a CUDA torch)")
    return True


def peak_tflops(args: argparse.Namespace, gpu: bool) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if not gpu:
        return None
    name = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = select_device(args.device)
    family = FAMILIES[args.config]
    frames, steps = args.frames or family.frames, args.steps or family.steps
    settings = AnimateSettings(steps=steps, preview_steps=args.preview_steps or steps,
                               guidance_scale=args.guidance_scale, cache_mode=args.cache_mode,
                               seed=0)
    jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    argv_shown = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/animate.py", *argv_shown]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(gpu),
        "run": {"config": args.config, "dtype": args.dtype, "size": family.size,
                "frames": frames, "steps": settings.steps,
                "preview_steps": settings.preview_steps,
                "guidance_scale": settings.guidance_scale, "cache_mode": settings.cache_mode},
        "evals": count_evals(settings),
    }
    log(f"building the {args.config} models ({args.dtype})")
    models = make_models(family, jdtype)
    if not args.skip_eval:
        e = bench_eval(models, family, frames, gpu=gpu, dtype_name=args.dtype,
                       warmup=args.warmup, repeats=args.repeats,
                       diffusers=not args.skip_diffusers)
        peak = peak_tflops(args, gpu)
        if family.flops_per_image and peak:
            work = family.flops_per_image * frames / (peak * 1e12)
            e.update(flops_per_image=family.flops_per_image, peak_tflops=peak,
                     mfu_ours=work / e["ours"]["median_s"],
                     mfu_diffusers=work / e["diffusers"]["median_s"] if "diffusers" in e
                     else None)
        report["eval"] = e
    if not args.skip_pipeline:
        report["pipeline"] = bench_pipeline(models, settings, family.size, frames)
    table = render(report)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
