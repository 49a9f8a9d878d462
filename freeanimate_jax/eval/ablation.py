"""The ablation of docs/QUALITY.md: the held-out toy cases animated by each variant of the
method, written as an evaluation set (`eval/table.py`) and scored against the world's truth.

Rows (the reference image is the held-out figure standing at rest; the poses are the case's):

- `ControlNet alone, "a person"` / `ControlNet alone, caption`: every frame sampled from noise
  with the pose ControlNet and the prompt only (FreeAnimate's preview with RA-SA off);
- `+ RA-SA`: the preview with reference-anchored self-attention, the caption;
- `+ IBA (self)` / `+ IBA (self and cross)`: the whole pipeline with RA-SA off, IBA on the
  decoder's self-attention (and cross-attention) layers;
- `full FreeAnimate`: RA-SA and IBA as the defaults set them;
- `full + motion module`: the same with the toy motion module inserted.

One compiled program serves every case of a row (only call-time values change between cases).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from freeanimate_jax.toy import motions, world
from freeanimate_jax.toy.data import Case

GENERIC_PROMPT = "a person"
SELF = ("up_blocks.*.attentions.*.attn1",)
SELF_CROSS = (*SELF, "up_blocks.*.attentions.*.attn2")
ROWS = ("ControlNet alone, \"a person\"", "ControlNet alone, caption", "+ RA-SA",
        "+ IBA (self)", "+ IBA (self and cross)", "full FreeAnimate", "full + motion module")


def held_out_cases(appearances: int = 8, motion_names: tuple[str, ...] = (
        motions.HELD_OUT_MOTION, "wave"), seeds: tuple[int, ...] = (0, 1, 2),
        frames: int = 16, size: int = 64) -> list[tuple[str, Case, int]]:
    """(name, case, sampling seed): one appearance per held-out outfit (skin, hair and
    background drawn from a fixed stream), each doing each motion, each sampled with each
    seed; the clip itself (speed, phase, size) is fixed per (appearance, motion)."""
    rng = np.random.default_rng(2024)
    pool = world.all_appearances(held_out=True)
    out = []
    for a in range(appearances):
        shirt, trousers = world.HELD_OUT_OUTFITS[a % len(world.HELD_OUT_OUTFITS)]
        options = [p for p in pool if (p.shirt, p.trousers) == (shirt, trousers)]
        appearance = options[int(rng.integers(len(options)))]
        for m in motion_names:
            case = Case(appearance, m, 1000 + a, frames, size)
            for s in seeds:
                out.append((f"a{a}-{m}-s{s}", case, s))
    return out


def reference_image(case: Case) -> np.ndarray:
    """The case's figure standing at rest (where the clip's figure stands), (H, W, 3) uint8."""
    first = case.keypoints_units()[0]
    hip = (first[8, :2] + first[11, :2]) / 2  # r_hip, l_hip
    height = float(np.linalg.norm(first[1, :2] - hip)) / 0.32  # neck-to-hip is 0.32 of it
    rest = motions.keypoints(motions.Skeleton(hip_x=float(hip[0]), hip_y=float(hip[1])), height)
    kp = world.to_pixels(rest, (case.size, case.size))
    return world.render_frame(kp, case.appearance, (case.size, case.size))


@dataclasses.dataclass
class Variant:
    row: str
    output: str  # "preview" or "frames"
    prompt: Callable[[Case], str]
    settings: dict[str, Any]
    motion: bool = False


def variants() -> list[Variant]:
    caption = lambda c: c.appearance.caption  # noqa: E731
    off = {"ra_sa_until": 0.0}
    return [
        Variant(ROWS[0], "preview", lambda c: GENERIC_PROMPT, off),
        Variant(ROWS[1], "preview", caption, off),
        Variant(ROWS[2], "preview", caption, {"ra_sa_until": 1.0}),
        Variant(ROWS[3], "frames", caption, {**off, "iba_layers": SELF}),
        Variant(ROWS[4], "frames", caption, {**off, "iba_layers": SELF_CROSS}),
        Variant(ROWS[5], "frames", caption, {}),
        Variant(ROWS[6], "frames", caption, {}, motion=True),
    ]


def run_ablation(out: str | Path, models: Any, video_models: Any, settings: Any,
                 cases: list[tuple[str, Case, int]], log=print) -> dict[str, Any]:
    """Animate every case with every variant into `out` (npz per video, set.json), score the
    set, write `table.md` / `table.json` and one contact sheet per motion; returns the
    scored result. `models`: the toy family with its ControlNet; `video_models`: the same
    with the motion module inserted; `settings`: the AnimateSettings every row starts from."""
    import time

    from freeanimate_jax.cli.eval import write
    from freeanimate_jax.eval.table import markdown, score_set
    from freeanimate_jax.io import contact_sheet, read_video, write_png_atomic, write_video
    from freeanimate_jax.pipelines.animate import FreeAnimate

    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    spec_cases = {name: {"name": name, "case": case.to_dict(), "videos": {}}
                  for name, case, _ in cases}
    pipes: dict[tuple, FreeAnimate] = {}
    t0 = time.perf_counter()
    done, total = 0, len(cases) * len(variants())
    for v in variants():
        program = {k: val for k, val in v.settings.items() if k == "iba_layers"}
        key = (v.motion, tuple(sorted(program.items())))
        if key not in pipes:
            pipes[key] = FreeAnimate(video_models if v.motion else models,
                                     dataclasses.replace(settings, **program))
        pipe = pipes[key]
        call = {k: val for k, val in v.settings.items() if k != "iba_layers"}
        for name, case, seed in cases:
            path = out / "videos" / f"{name}.{_slug(v.row)}.npz"
            if not path.is_file():  # a stopped ablation resumes where it was
                result = pipe(reference_image(case), case.poses(), v.prompt(case), seed=seed,
                              **call)
                write_video(path, getattr(result, v.output), 8.0)
            spec_cases[name]["videos"][v.row] = str(path.relative_to(out))
            done += 1
            rate = (time.perf_counter() - t0) / done
            log(f"[ablation] {done}/{total} {v.row} {name} | ETA {rate * (total - done):.0f}s")
    spec = {"rows": [v.row for v in variants()], "cases": list(spec_cases.values())}
    (out / "set.json").write_text(json.dumps(spec, indent=1) + "\n")
    result = score_set(out)
    write(result, out / "table.md", out / "table.json")
    by_motion: dict[str, tuple[str, Case]] = {}
    for name, case, _ in cases:
        by_motion.setdefault(case.motion, (name, case))
    for motion, (name, case) in by_motion.items():
        columns = {"reference": reference_image(case), "truth": case.video(),
                   "pose": case.poses()}
        for v in variants():
            columns[v.row] = read_video(out / spec_cases[name]["videos"][v.row])[0]
        write_png_atomic(out / f"sheet-{motion}.png", contact_sheet(columns, rows=4))
    log(markdown(result))
    return result


def _slug(row: str) -> str:
    keep = [ch if ch.isalnum() else "-" for ch in row.lower()]
    return "-".join(filter(None, "".join(keep).split("-")))
