"""Motion-module training step: ours (`train.step.make_step`, JAX) against a diffusers
`UNetMotionModel` training step in PyTorch, same weights, same inputs, same optimizer.

    python -m benchmarks.train --config tiny               # CPU, about a minute
    python -m benchmarks.train --config mid                # CPU, a few minutes
    python -m benchmarks.train --config sd15 --device gpu  # GPU, bf16, with MFU

Both sides train the motion modules of one UNet (the family's, random weights drawn by our
initialisers) with a v3-layout motion adapter whose weights are random and non-zero (a new
adapter's zero `proj_out` would leave most gradients zero), the UNet frozen; DDPM noise with
linear betas 0.00085 -> 0.012, epsilon MSE, global-norm clipping at 1.0 and AdamW (1e-4,
betas 0.9/0.999, weight decay 1e-2, eps 1e-8). Our weights are copied into diffusers'
`UNet2DConditionModel` and `MotionAdapter` (`export_state_dict` + `load_state_dict(strict=True)`)
and joined with `UNetMotionModel.from_unet2d`; our adapter normalises across frames
(`norm_per_frame=False`) as diffusers' does, so both compute the same function.

Ours gets the latent cache's batch form (posterior mean/log-std and text embeddings), so no VAE
or text encoder is in the step. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.animate import MID_CONFIGS, log, machine_info, select_device, xla_flops
from freeanimate_jax.demo import TINY_CONFIGS
from freeanimate_jax.models import known_configs as kc
from freeanimate_jax.models.motion import UNetMotionModel
from freeanimate_jax.train import objective, step
from freeanimate_jax.train import state as train_state
from freeanimate_jax.train.metrics import peak_flops
from freeanimate_jax.train.settings import DataConfig, NoiseConfig, OptimConfig
from freeanimate_jax.weights.convert import export_state_dict
from freeanimate_jax.weights.loader import build

TOKENS = 77  # CLIP's padded prompt length
LAYOUT = "v3"
TRAINED = "motion_modules"  # the trainer's default `train.trainable`
OPTIM = OptimConfig()  # AdamW 1e-4, (0.9, 0.999), decay 1e-2, eps 1e-8, clip 1.0, constant lr
NOISE = NoiseConfig()  # DDPM, linear 0.00085 -> 0.012, 1000 steps, epsilon


@dataclasses.dataclass(frozen=True)
class Family:
    unet: dict  # diffusers UNet2DConditionModel config
    size: int  # pixels, square (latents are size / 8)
    frames: int
    batch: int
    # Forward + backward of the motion gradients per clip, where an analytic figure exists
    # (SD1.5 + v3 at 16x256x256: about 9.06 TFLOP); only used at exactly those shapes.
    flops_per_clip: float | None = None


FAMILIES = {
    "tiny": Family(TINY_CONFIGS["unet"], 64, frames=8, batch=2),
    "mid": Family(MID_CONFIGS["unet"], 128, frames=8, batch=2),
    "sd15": Family(kc.SD15_UNET, 256, frames=16, batch=4, flops_per_clip=9.06e12),
}


def loadavg() -> str | None:
    """/proc/loadavg as it reads (1, 5, 15 minute loads, runnable/total tasks, last pid)."""
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.is_file() else None


# -- models --------------------------------------------------------------------------------------

def make_models(family: Family, seed: int = 0) -> tuple[nnx.Module, nnx.Module, dict]:
    """(our fp32 UNet2DConditionModel, a random non-zero v3 MotionAdapter that normalises
    across frames, the adapter's diffusers config)."""
    unet = build(family.unet, seed=seed)
    config = train_state.new_adapter_config(family.unet, LAYOUT)
    # `build` draws every weight, `proj_out` included (a new adapter zero-initialises it).
    adapter = build(config, seed=seed + 1, norm_per_frame=False)
    return unet, adapter, config


def torch_model(unet: nnx.Module, adapter: nnx.Module, adapter_config: dict) -> Any:
    """diffusers' UNetMotionModel holding our weights (fp32, on the CPU)."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel
    from diffusers import UNetMotionModel as TorchMotion

    def tensors(model: nnx.Module) -> dict[str, Any]:
        return {k: torch.from_numpy(np.array(v, np.float32))
                for k, v in export_state_dict(model).items()}

    ref_unet = UNet2DConditionModel.from_config(dict(unet.config))
    ref_unet.load_state_dict(tensors(unet), strict=True)
    ref_adapter = MotionAdapter.from_config(adapter_config)
    state = tensors(adapter)
    # The sinusoidal position tables are fixed buffers ours recomputes rather than stores:
    # take diffusers' own, so the strict load still checks every other key.
    state.update({k: v for k, v in ref_adapter.state_dict().items() if k.endswith(".pe")})
    ref_adapter.load_state_dict(state, strict=True)
    return TorchMotion.from_unet2d(ref_unet, ref_adapter)


# -- inputs --------------------------------------------------------------------------------------

def cached_batch(family: Family, frames: int, size: int, batch: int) -> dict[str, np.ndarray]:
    """A batch in the latent cache's form: posterior mean/log-std per frame, text embeddings,
    the empty prompt's embedding."""
    rng = np.random.default_rng(0)
    latent, dim = size // 8, family.unet["cross_attention_dim"]
    shape = (batch, frames, latent, latent, 4)
    return {"mean": 4.0 * rng.standard_normal(shape, np.float32),  # SD latents' scale
            "logstd": np.full(shape, -3.0, np.float32),
            "context": rng.standard_normal((batch, TOKENS, dim), np.float32),
            "empty": rng.standard_normal((TOKENS, dim), np.float32)}


def step_inputs(cfg: step.StepConfig, batch: dict[str, np.ndarray], n: int
                ) -> list[dict[str, np.ndarray]]:
    """What our step feeds its loss at steps 0..n-1 (clean latents, noise, timesteps, text
    after caption dropout), from the step's own draws (`fold_in(key(seed), step)`): the torch
    side gets these, so both see the same inputs at every step."""
    b = batch["mean"].shape[0]

    @jax.jit
    def inputs(i):
        return step.model_inputs(cfg, step.draws(cfg, i, b), batch["mean"], batch["logstd"],
                                 batch["context"], batch["empty"])

    return [jax.tree.map(np.asarray, inputs(jnp.int32(i))) for i in range(n)]


# -- the two sides -------------------------------------------------------------------------------

def _summary(times: list[float], first: float, batch: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {"first_s": first, "median_s": median, "min_s": min(times), "max_s": max(times),
            "times_s": times, "clips_per_s": batch / median}


def run_ours(unet: nnx.Module, adapter: nnx.Module, batch: dict[str, np.ndarray],
             cfg: step.StepConfig, warmup: int, steps: int) -> dict[str, Any]:
    """The product's step: `make_step` on the trainer's state, donated, `warmup` untimed steps
    after the first (compiling) one, then `steps` timed."""
    model = UNetMotionModel.from_unet2d(unet, adapter)
    graphdef, trained, frozen = train_state.split(model, TRAINED)
    # As the Trainer: the frozen UNet in the compute dtype, the trained params fp32.
    frozen = jax.tree.map(lambda x: x.astype(cfg.compute_dtype)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    total = 1 + warmup + steps
    tx = train_state.optimizer(OPTIM, total)
    fn = step.make_step(graphdef, tx, train_state.learning_rate(OPTIM, total),
                        objective.alphas(NOISE), cfg)
    state = train_state.init_state(trained, tx, OPTIM)
    device_batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
    # Lowered before the first call: the donated state is still whole. Tracing only.
    flops = xla_flops(fn.lower(state, device_batch, frozen, None))
    times, losses, norms, first = [], [], [], 0.0
    for i in range(total):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(fn(state, device_batch, frozen, None))
        elapsed = time.perf_counter() - t0
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        if i == 0:
            first = elapsed
            log(f"ours: first step {elapsed:.2f} s (compiles)")
        elif i > warmup:
            times.append(elapsed)
    out = _summary(times, first, batch["mean"].shape[0])
    out.update(losses=losses, grad_norms=norms, xla_flops_per_step=flops,
               trained_params=sum(x.size for x in jax.tree.leaves(trained)),
               frozen_params=sum(x.size for x in jax.tree.leaves(nnx.filter_state(frozen,
                                                                                  nnx.Param))))
    return out


def run_diffusers(ref: Any, inputs: list[dict[str, np.ndarray]], *, gpu: bool, bf16: bool,
                  warmup: int, steps: int) -> dict[str, Any]:
    """diffusers' recipe: the UNet frozen (`freeze_unet2d_params`), AdamW over the motion
    params, `clip_grad_norm_(1.0)`, MSE against the noise on DDPMScheduler.add_noise latents.
    bf16: the frozen weights in bf16, the trained ones fp32, under `torch.autocast`."""
    import torch
    from diffusers import DDPMScheduler

    device = "cuda" if gpu else "cpu"
    ref.freeze_unet2d_params()
    params = [p for p in ref.parameters() if p.requires_grad]
    if bf16:
        for p in ref.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if gpu:  # on the CPU `.to` is a no-op that diffusers warns about
        ref = ref.to(device)
    ref.train()
    opt = torch.optim.AdamW(params, lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2),
                            weight_decay=OPTIM.weight_decay, eps=OPTIM.eps)
    sched = DDPMScheduler(num_train_timesteps=NOISE.num_train_timesteps,
                          beta_start=NOISE.beta_start, beta_end=NOISE.beta_end,
                          beta_schedule=NOISE.beta_schedule)

    def to_torch(x: dict[str, np.ndarray]) -> dict[str, Any]:
        frames = x["z0"].shape[1]

        def video(a: np.ndarray) -> Any:  # (B, F, h, w, C) -> diffusers' (B, C, F, h, w)
            return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 4, 1, 2, 3))).to(device)

        # UNetMotionModel wants one context per frame (its pipelines repeat the prompt's).
        ctx = torch.from_numpy(np.array(x["context"])).repeat_interleave(frames, 0)
        return {"z0": video(x["z0"]), "noise": video(x["noise"]),
                "t": torch.from_numpy(x["t"].astype(np.int64)).to(device),
                "context": ctx.to(device)}

    batches = [to_torch(x) for x in inputs]  # on the device before timing, as ours
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())

    def train_step(x: dict[str, Any]) -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        noisy = sched.add_noise(x["z0"], x["noise"], x["t"])  # fp32, as ours
        with autocast:
            pred = ref(noisy, x["t"], x["context"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x["noise"])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, OPTIM.grad_clip)
        opt.step()
        if gpu:
            torch.cuda.synchronize()
        return loss.item(), norm.item()

    times, losses, norms, first = [], [], [], 0.0
    log(f"diffusers: {torch.get_num_threads()} torch threads")
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        loss, norm = train_step(x)
        elapsed = time.perf_counter() - t0
        losses.append(loss)
        norms.append(norm)
        if i == 0:
            first = elapsed
            log(f"diffusers: first step {elapsed:.2f} s")
        elif i > warmup:
            times.append(elapsed)
    out = _summary(times, first, inputs[0]["z0"].shape[0])
    out.update(losses=losses, grad_norms=norms, trained_params=sum(p.numel() for p in params),
               attn_processor=type(next(iter(ref.attn_processors.values()))).__name__)
    return out


# -- report --------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    m, r, ours = report["machine"], report["run"], report["ours"]
    ref = report.get("diffusers")
    lines = [f"## Motion training step: `{r['config']}` ({m['jax_backend']}, {r['dtype']})", "",
             "| | |", "|---|---|",
             f"| command | `{report['command']}` |", f"| date | {report['date']} |",
             f"| machine | {m['processor']}, {m['nproc']} CPUs, {m['cpu_model'] or 'unknown CPU'}"
             f"; /proc/loadavg before ours `{report['loadavg']['ours']}`, before diffusers "
             f"`{report['loadavg'].get('diffusers', '-')}` |",
             f"| devices | JAX: {m['jax_device']}; torch: {m['torch_device']} "
             f"({m['torch_threads']} threads) |",
             "| versions | " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + " |",
             f"| run | {r['frames']}x{r['size']}x{r['size']} (latents {r['size'] // 8}x"
             f"{r['size'] // 8}), batch {r['batch']}, v3 motion adapter, "
             f"{ours['trained_params'] / 1e6:.2f} M trained / {ours['frozen_params'] / 1e6:.1f} M "
             f"frozen params; 1 first step, {r['warmup']} warm, median of {r['steps']} |", "",
             "| side | compile / first step (s) | median s/step | min s/step | clips/s "
             "| diffusers / ours |", "|---|---:|---:|---:|---:|---:|",
             f"| ours (JAX, `make_step`) | {_f(ours['first_s'], 2)} | {_f(ours['median_s'], 4)} "
             f"| {_f(ours['min_s'], 4)} | {_f(ours['clips_per_s'], 3)} | |"]
    if ref:
        lines.append(f"| diffusers (PyTorch) | {_f(ref['first_s'], 2)} | {_f(ref['median_s'], 4)}"
                     f" | {_f(ref['min_s'], 4)} | {_f(ref['clips_per_s'], 3)} "
                     f"| **{_f(report['ratio'], 2)}** |")
    notes = [">1 means ours is faster."]
    if ref:
        c = report["check"]
        notes.append(f"First-step loss: ours {c['loss_ours']:.7f}, diffusers "
                     f"{c['loss_diffusers']:.7f} (|diff| {c['loss_diff']:.1e}; largest over all "
                     f"{len(ours['losses'])} steps {c['max_loss_diff']:.1e}); first-step "
                     f"gradient norm: ours {c['grad_norm_ours']:.5f}, diffusers "
                     f"{c['grad_norm_diffusers']:.5f}. diffusers attention: "
                     f"`{ref['attn_processor']}`.")
    f = report.get("flops", {})
    if f.get("xla_per_clip"):
        notes.append(f"XLA counts {f['xla_per_clip'] / 1e9:.1f} GFLOP per clip per step; ours "
                     f"achieves {f['xla_per_clip'] * ours['clips_per_s'] / 1e12:.3f} TFLOP/s.")
    if f.get("peak"):
        mfu = ", ".join(f"{k} {v:.1%}" for k, v in report["mfu"].items())
        notes.append(f"MFU (peak {f['peak'] / 1e12:.0f} TFLOP/s): {mfu}.")
    return "\n".join([*lines, "", " ".join(notes)]) + "\n"


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(FAMILIES),
                    help="UNet family and default shapes (default: mid on cpu, sd15 on gpu)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="compute dtype, both sides; trained params stay fp32 (default: float32 "
                         "on cpu, bfloat16 on gpu)")
    ap.add_argument("--frames", type=int, help="frames per clip")
    ap.add_argument("--size", type=int, help="pixels, square, a multiple of 64")
    ap.add_argument("--batch", type=int, help="clips per step")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps after the first (compiling) one")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--skip-diffusers", action="store_true", help="time ours only")
    ap.add_argument("--json", type=Path, help="write the raw numbers as JSON here")
    args = ap.parse_args(argv)
    args.config = args.config or ("sd15" if args.device == "gpu" else "mid")
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    for name in ("frames", "size", "batch", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be 0 or more")
    if args.size is not None and args.size % 64:
        ap.error("--size must be a multiple of 64 (latents a multiple of 8)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = select_device(args.device)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    family = FAMILIES[args.config]
    frames, size = args.frames or family.frames, args.size or family.size
    batch_size = args.batch or family.batch
    bf16 = args.dtype == "bfloat16"
    cfg = step.StepConfig(noise=NOISE, caption_dropout=DataConfig().caption_dropout,
                          grad_accum=1, seed=0,
                          compute_dtype=jnp.bfloat16 if bf16 else jnp.float32)
    argv_shown = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.train", *argv_shown]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(gpu),
        "run": {"config": args.config, "dtype": args.dtype, "frames": frames, "size": size,
                "batch": batch_size, "warmup": args.warmup, "steps": args.steps},
        "loadavg": {},
    }
    log(f"building the {args.config} UNet and a random v3 motion adapter")
    unet, adapter, adapter_config = make_models(family)
    batch = cached_batch(family, frames, size, batch_size)
    total = 1 + args.warmup + args.steps
    # Built before ours runs: `make_step` donates the state, the torch copy reads the weights.
    ref = None if args.skip_diffusers else torch_model(unet, adapter, adapter_config)

    report["loadavg"]["ours"] = loadavg()
    log(f"ours: {total} steps, batch {batch_size}, {frames}x{size}x{size}")
    ours = report["ours"] = run_ours(unet, adapter, batch, cfg, args.warmup, args.steps)
    if ref is not None:
        # The same inputs as ours at every step: our step's own draws, computed again here
        # from the same seed and step numbers, handed to torch as numpy arrays; torch noises
        # them with DDPMScheduler.add_noise (its alphas_cumprod equal ours bit for bit).
        inputs = step_inputs(cfg, batch, total)
        report["loadavg"]["diffusers"] = loadavg()
        log(f"diffusers: {total} steps")
        ref_out = report["diffusers"] = run_diffusers(ref, inputs, gpu=gpu, bf16=bf16,
                                                      warmup=args.warmup, steps=args.steps)
        if ref_out["trained_params"] != ours["trained_params"]:
            raise RuntimeError(f"trained parameter counts differ: ours {ours['trained_params']},"
                               f" diffusers {ref_out['trained_params']}")
        report["ratio"] = ref_out["median_s"] / ours["median_s"]
        report["check"] = {
            "loss_ours": ours["losses"][0], "loss_diffusers": ref_out["losses"][0],
            "loss_diff": abs(ours["losses"][0] - ref_out["losses"][0]),
            "max_loss_diff": max(abs(a - b) for a, b in zip(ours["losses"], ref_out["losses"],
                                                            strict=True)),
            "grad_norm_ours": ours["grad_norms"][0],
            "grad_norm_diffusers": ref_out["grad_norms"][0]}
    flops: dict[str, Any] = {}
    if ours["xla_flops_per_step"]:
        flops["xla_per_clip"] = ours["xla_flops_per_step"] / batch_size
    peak = peak_flops(jax.devices()[0].device_kind) if gpu else None
    if peak:
        flops["peak"] = peak
        analytic = family.flops_per_clip if (frames, size) == (family.frames, family.size) \
            else None
        flops["analytic_per_clip"] = analytic
        mfu = {}
        for name, per_clip in (("XLA count", flops.get("xla_per_clip")),
                               ("9.06 TFLOP/clip", analytic)):
            if per_clip:
                for side in ("ours", "diffusers"):
                    if side in report:
                        mfu[f"{side} ({name})"] = (per_clip * report[side]["clips_per_s"]
                                                   / peak)
        report["mfu"] = mfu
    report["flops"] = flops
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
