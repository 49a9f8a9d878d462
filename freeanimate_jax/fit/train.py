"""`freeanimate fit train`: does a training run fit a TPU slice, and with what batch per chip?

The trainer's own step (`train.program.build`: the trained/frozen split, the optimizer, the
state shardings and the runtime policy of `freeanimate train run`) over the runbook's models
(SD1.5 + a new motion module of `train.motion`'s layout, or the tiny family), built abstractly,
lowered on the topology's data-parallel mesh through the step's own mesh entry and compiled
ahead of time, for each remat policy and batch per chip. The largest batch that fits is found
by bisection: doubling from 1 until a batch does not fit, then halving the interval between
the last that fits and the first that does not.

FLOPs per clip are counted from the step's jaxpr on one device with the XLA attention path
(`fit.flops`): forward + backward of the remat-free step (the model FLOPs MFU is quoted in),
and the time per step they imply at the chip's peak is the floor a run can approach.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from freeanimate_jax.fit.core import Fitter, GiB, StageFit, chips_text, compile_into

REMATS = ("none", "full")
# Peak dense bf16 FLOP/s per chip (datasheets), by chip family.
PEAK_FLOPS = {"v5e": 197e12, "v4": 275e12, "v5p": 459e12, "v6e": 918e12}


@dataclasses.dataclass
class BatchFit:
    """One compile: a remat policy and a batch per chip, with the per-chip breakdown."""

    remat: str
    batch_per_chip: int
    fit: StageFit
    weights: int = 0  # frozen weights + trained parameters (+ the frozen encoders)
    optimizer: int = 0  # AdamW's moments (+ the EMA)
    batch: int = 0
    ok: bool = False  # compiled, and its total within the chip's HBM

    @property
    def activations(self) -> int:
        return self.fit.temps



def _job_with(job, **train):
    return dataclasses.replace(job, train=dataclasses.replace(job.train, **train))


def step_program(job, dtype, mesh, hbm: int | None):
    """The trainer's step program for `job` on `mesh`, over abstract models."""
    import jax.numpy as jnp

    from freeanimate_jax.train import program
    from freeanimate_jax.train.loop import build_models

    models = build_models(job, jnp.dtype(dtype), abstract=True)
    p = program.build(job, models.trained_model, program.step_encoders(job, models), mesh,
                      compute_dtype=jnp.dtype(dtype), chip_bytes=hbm)
    return p, models


def step_args(p, models, global_batch: int, frames: int, size_hw: tuple[int, int]):
    unet = models.unet.cfg
    return p.abstract_args(
        global_batch, frames, size_hw, latent_channels=unet.in_channels,
        latent_factor=models.vae.downscale, context_dim=unet.cross_attention_dim,
        condition=models.controlnet is not None)


def compile_batch(fitter: Fitter, job, remat: str, batch_per_chip: int, frames: int,
                  size_hw: tuple[int, int], dtype: str) -> BatchFit:
    """Lower and compile the step at `batch_per_chip` with `remat`; the per-chip figures."""
    job = _job_with(job, remat=remat, batch_per_chip=batch_per_chip, global_batch=None)
    p, models = step_program(job, dtype, fitter.mesh, fitter.hbm)
    state, batch, frozen, encoders = step_args(p, models, batch_per_chip * fitter.mesh.size,
                                           frames, size_hw)
    label = f"remat {remat}, batch {batch_per_chip}/chip"
    st = StageFit(label)
    clock = time.perf_counter()
    fitter.log(f"{label}: lowering")
    lowered = p.step.lower(state, batch, frozen, encoders)
    fitter.log(f"{label}: compiling")
    compile_into(st, lowered)
    st.compile_s = time.perf_counter() - clock
    per = fitter.per_chip
    out = BatchFit(remat, batch_per_chip, st,
                   weights=per(frozen) + per(state["params"]) + per(encoders or {}),
                   optimizer=per(state["opt"]) + per(state.get("ema", {})),
                   batch=per(batch), ok=st.error is None and st.total <= fitter.hbm)
    # The whole row in the log: a long search stopped part-way still leaves its figures.
    figures = (f"{st.total / GiB:.2f} GiB (weights {out.weights / GiB:.2f}, optimizer "
               f"{out.optimizer / GiB:.2f}, batch {out.batch / GiB:.3f}, activations "
               f"{out.activations / GiB:.2f}), {'fits' if out.ok else 'does not fit'}")
    fitter.log(f"{label}: {st.error or figures} ({st.compile_s:.0f}s)")
    return out


def largest_batch(try_batch, limit: int) -> tuple[int, list]:
    """The largest b in [1, limit] whose `try_batch(b).ok`, by doubling then bisection (fitting
    is monotone in the batch): (0 if even 1 does not fit, every result tried, by batch)."""
    tried: dict[int, Any] = {}

    def fits(b: int) -> bool:
        if b not in tried:
            tried[b] = try_batch(b)
        return tried[b].ok

    good, b = 0, 1
    while b <= limit and fits(b):
        good, b = b, 2 * b
    if good:
        bad = min(b, limit + 1)  # the first that did not fit, or past the limit
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, [tried[k] for k in sorted(tried)]


def flops_per_clip(job, frames: int, size_hw: tuple[int, int], dtype: str) -> float:
    """Matmul and convolution FLOPs of one clip's forward + backward in the remat-free step,
    from its jaxpr on one CPU device (XLA attention)."""
    import jax

    from freeanimate_jax import parallel
    from freeanimate_jax.fit import flops

    job = _job_with(job, remat="none", batch_per_chip=1, global_batch=None,
                    state_sharding="replicate")
    mesh = parallel.data_mesh(jax.devices("cpu")[:1])
    p, models = step_program(job, dtype, mesh, None)
    args = step_args(p, models, 1, frames, size_hw)
    return float(flops.count(p.step.jitted.trace(*args).jaxpr))


def fit_train(topology: str, job, frames: int, size_hw: tuple[int, int], *,
              remats: tuple[str, ...] = REMATS, batch: int | None = None,
              max_batch: int = 64, dtype: str = "bfloat16", hbm_gib: float | None = None,
              log=lambda msg: None) -> dict:
    """Per remat policy: the largest batch per chip that fits (or only `batch`), with every
    compile's per-chip breakdown; FLOPs per clip and the step time they imply at peak."""
    fitter = Fitter(topology, hbm_gib=hbm_gib, log=log, training=True)
    rows, best = [], {}
    for remat in remats:
        def attempt(b: int, remat=remat) -> BatchFit:
            return compile_batch(fitter, job, remat, b, frames, size_hw, dtype)

        if batch is not None:
            tried = [attempt(batch)]
            best[remat] = batch if tried[0].ok else 0
        else:
            best[remat], tried = largest_batch(attempt, max_batch)
        rows += tried
    model_flops = flops_per_clip(job, frames, size_hw, dtype)
    peak = PEAK_FLOPS.get(fitter.family)
    fits = any(v > 0 for v in best.values())
    return {
        "topology": topology, "libtpu_topology": fitter.libtpu_topology,
        "chips": fitter.mesh.size, "hbm_bytes": fitter.hbm, "pipeline": "train",
        "frames": frames, "size": list(size_hw), "dtype": dtype,
        "tiny": job.model == "builtin:tiny", "motion": job.train.motion,
        "trainable": job.train.trainable, "source": job.data.source,
        "rows": [{"remat": r.remat, "batch_per_chip": r.batch_per_chip, "fits": r.ok,
                  "error": r.fit.error, "weights": r.weights, "optimizer": r.optimizer,
                  "batch": r.batch, "activations": r.activations, "total": r.fit.total,
                  "compile_s": r.fit.compile_s} for r in rows],
        "largest_batch_per_chip": best,
        "flops_per_clip": model_flops,
        "peak_flops": peak,
        "step_floor_s": {k: (model_flops * v / peak if peak and v else None)
                         for k, v in best.items()},
        "fits": fits,
        "verdict": ("fits: " + ", ".join(f"remat {k}: up to {v} clips per chip"
                                         for k, v in best.items() if v))
        if fits else f"does not fit: not even 1 clip per chip within "
                     f"{fitter.hbm / GiB:.2f} GiB",
    }


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:9.3f}"  # noqa: E731
    lines = [f"Training step on {r['topology']} ({chips_text(r)}, {r['hbm_bytes'] / GiB:.2f} "
             f"GiB usable per chip): {r['frames']} frames at {r['size'][0]}x{r['size'][1]}px, "
             f"{r['dtype']}, {'tiny models' if r['tiny'] else 'SD1.5'} + new "
             f"{r['motion']}-layout module, trains {r['trainable']!r}, data {r['source']}",
             "GiB per chip: weights (frozen + trained), optimizer state, batch, activations "
             "(the compiler's temporaries), total (args + temps + outputs - donated)",
             f"{'remat':<6}|{'batch':>6} |{'weights':>9} |{'optim':>9} |{'batch':>9} |"
             f"{'activ.':>9} |{'total':>9} | fits | compile"]
    for x in r["rows"]:
        head = f"{x['remat']:<6}|{x['batch_per_chip']:>6} |"
        if x["error"]:
            lines.append(f"{head} {x['error']} ({x['compile_s']:.0f}s)")
            continue
        lines.append(f"{head}{gib(x['weights'])} |{gib(x['optimizer'])} |{gib(x['batch'])} |"
                     f"{gib(x['activations'])} |{gib(x['total'])} | "
                     f"{'yes' if x['fits'] else 'NO':<4} | {x['compile_s']:.0f}s")
    tf = r["flops_per_clip"] / 1e12
    lines.append(f"FLOPs per clip (forward + backward, matmuls and convolutions, no remat): "
                 f"{tf:.3f} TFLOP")
    for remat, b in r["largest_batch_per_chip"].items():
        floor = r["step_floor_s"].get(remat)
        lines.append(f"remat {remat}: largest batch {b} per chip" + (
            f"; at peak ({r['peak_flops'] / 1e12:.0f} TFLOP/s per chip) a step takes at least "
            f"{floor:.3f} s ({b * r['chips']} clips)" if floor else ""))
    lines.append(r["verdict"])
    return "\n".join(lines)
