"""Classifier-free guidance's two branches as one batched UNet + ControlNet call (IBA on the
conditional half only) against two calls: per-stage first-call and warm-call wall time of a
FreeAnimate run, and the largest frame difference.

    python -m benchmarks.cfg_batch --config mid      # from the repository root
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.animate import FAMILIES, make_models
from freeanimate_jax.pipelines.animate import AnimateSettings, Denoise, FreeAnimate
from freeanimate_jax.pipelines.core import execute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid", choices=sorted(FAMILIES))
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    jax.config.update("jax_platforms", "cpu")
    fam = FAMILIES[a.config]
    models = make_models(fam, jnp.float32)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (fam.size, fam.size, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (a.frames, fam.size, fam.size, 3), dtype=np.uint8)
    s = AnimateSettings(steps=a.steps, preview_steps=a.steps, guidance_scale=7.5, seed=0)
    report, frames = {}, {}
    for batched in (False, True):
        pipe = FreeAnimate(models, s)
        plan = [dataclasses.replace(st, stage=dataclasses.replace(
            st.stage, program=dataclasses.replace(st.stage.program, batch_cfg=batched)))
            if isinstance(st.stage.program, Denoise) else st for st in pipe.plan(s)]
        runs = []
        for _ in range(2):  # first call (compiles), warm call
            host = pipe.host_inputs(ref, poses, pipe.token_ids("a person dancing", ""), s)
            buf = {**pipe.weights(), **{k: pipe.place(v, ax) for k, (v, ax) in host.items()}}
            timings: dict[str, float] = {}
            execute(plan, buf, None, timings)
            runs.append(timings)
        frames[batched] = np.asarray(buf["frames"])
        report["batched" if batched else "two calls"] = {
            stage: {"first_s": runs[0][stage], "warm_s": runs[1][stage],
                    "compile_s": runs[0][stage] - runs[1][stage]}
            for stage in ("preview", "denoise")}
    report["max_frame_diff"] = float(np.abs(frames[True] - frames[False]).max())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
