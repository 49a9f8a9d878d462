"""Compile time per stage, and what a second call with another seed costs.

    python -m benchmarks.compile --config mid --json mid_compile.json   # from the repo root

For FreeAnimate and for AnimateDiff generate (the family's UNet with a v3-layout motion module
of its width), three calls with the same shapes: the first (it compiles every stage), a warm
one with the same settings, and one with another seed. A stage's compile time is its first-call
wall time minus its warm-call time. Where a pipeline takes settings per call the seed changes
on the same object; where it does not (the code before call-time settings) a new pipeline is
built with the new seed, the only way it had. The XLA compilations of that third call are
counted (jax's own monitoring event).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.animate import FAMILIES, make_models

PROMPT = "a person dancing"


class Compiles:
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._seen)

    def _seen(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1


def _timed(call) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, dict(result.timings)


def _takes_settings(pipe) -> bool:
    params = inspect.signature(pipe.__call__).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


def _three_calls(make, call, counter: Compiles) -> dict:
    pipe = make(0)
    first, first_st = _timed(lambda: call(pipe, {}))
    warm, warm_st = _timed(lambda: call(pipe, {}))
    before = counter.count
    if _takes_settings(pipe):
        second, second_st = _timed(lambda: call(pipe, {"seed": 1}))
        how = "same pipeline, seed=1 per call"
    else:
        other = make(1)
        second, second_st = _timed(lambda: call(other, {}))
        how = "new pipeline built with seed=1"
    return {"first_s": first, "warm_s": warm, "second_seed_s": second,
            "second_seed_fraction": second / first, "second_seed_compiles": counter.count - before,
            "second_seed_how": how,
            "stages": {k: {"first_s": first_st[k], "warm_s": warm_st.get(k),
                           "compile_s": first_st[k] - warm_st.get(k, 0.0),
                           "second_seed_s": second_st.get(k)} for k in first_st}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid", choices=sorted(FAMILIES))
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    from freeanimate_jax.models.motion import UNetMotionModel
    from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate
    from freeanimate_jax.pipelines.generate import Generate, GenerateSettings
    from freeanimate_jax.weights.loader import build

    fam = FAMILIES[a.config]
    models = make_models(fam, jnp.float32)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (fam.size, fam.size, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (a.frames, fam.size, fam.size, 3), dtype=np.uint8)
    counter = Compiles()
    s = AnimateSettings(steps=a.steps, preview_steps=a.steps, guidance_scale=7.5, seed=0)
    report = {"command": " ".join(["python -m benchmarks.compile", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load "
                         f"{os.getloadavg()[0]:.2f} at start",
              "jax": jax.__version__, "config": a.config, "frames": a.frames, "steps": a.steps}
    report["animate"] = _three_calls(
        lambda seed: FreeAnimate(models, dataclasses.replace(s, seed=seed)),
        lambda pipe, kw: pipe(ref, poses, PROMPT, **kw), counter)
    channels = fam.configs["unet"]["block_out_channels"]
    adapter = build(dict(_class_name="MotionAdapter", block_out_channels=channels,
                         motion_layers_per_block=fam.configs["unet"]["layers_per_block"],
                         motion_num_attention_heads=8, motion_norm_num_groups=32,
                         motion_max_seq_length=32, use_motion_mid_block=False), seed=11)
    video = dataclasses.replace(models, unet=UNetMotionModel.from_unet2d(models.unet, adapter),
                                controlnet=None)
    gs = GenerateSettings(frames=a.frames, steps=a.steps, guidance_scale=7.5, seed=0)
    report["generate"] = _three_calls(
        lambda seed: Generate(video, dataclasses.replace(gs, seed=seed)),
        lambda pipe, kw: pipe(PROMPT, (fam.size, fam.size), **kw), counter)
    print(json.dumps(report, indent=1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
