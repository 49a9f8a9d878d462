"""The ablation of docs/QUALITY.md: the held-out toy cases animated by each variant of the
method, written as an evaluation set (`eval/table.py`) and scored against the world's truth.

Rows (the reference image is the held-out figure standing at rest; the poses are the case's;
one seed's noise starts every row of a case):

- `ControlNet alone, "a person"` / `ControlNet alone, caption`: every frame sampled from noise
  with the pose ControlNet and the prompt only (FreeAnimate's preview with RA-SA off);
- `+ RA-SA`: the preview with reference-anchored self-attention, the caption;
- `+ IBA (self)` / `+ IBA (self and cross)`: the whole pipeline with RA-SA off, IBA on the
  decoder's self-attention (and cross-attention) layers;
- `full FreeAnimate`: RA-SA and IBA as the defaults set them;
- `full + motion module`: the same with the toy motion module inserted;
- `..., reference start`: ControlNet alone (caption), + RA-SA, + IBA (self), full and full +
  motion module again with `preview_from_reference=1`: every preview frame started from the
  reference's DDIM inversion instead of its own noise (the rows above start from noise, as
  earlier releases did; the toy demo uses the reference start).

Eight pipeline calls per case fill the twelve rows: a call's preview and final frames are two
rows (ControlNet alone with the caption is the preview of the IBA (self) call, + RA-SA the
preview of the full call, and so for the reference start). One compiled program serves every
case of a call.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from freeanimate_jax.toy.data import Case

GENERIC_PROMPT = "a person"
SELF = ("up_blocks.*.attentions.*.attn1",)
SELF_CROSS = (*SELF, "up_blocks.*.attentions.*.attn2")
REF_START = ", reference start"
ROWS = ("ControlNet alone, \"a person\"", "ControlNet alone, caption", "+ RA-SA",
        "+ IBA (self)", "+ IBA (self and cross)", "full FreeAnimate", "full + motion module",
        f"ControlNet alone{REF_START}", f"+ RA-SA{REF_START}", f"+ IBA (self){REF_START}",
        f"full FreeAnimate{REF_START}", f"full + motion module{REF_START}")
BASELINE = ROWS[1]  # what every row is compared with (`table.differences`)


@dataclasses.dataclass
class Call:
    """One pipeline call per case; it fills the rows named in `rows` (output -> row) from its
    preview and/or its final frames, so rows that are one call's two outputs cost one call."""

    prompt: Callable[[Case], str]
    settings: dict[str, Any]  # call-time settings
    rows: dict[str, str]  # "preview" / "frames" -> row
    iba_layers: tuple[str, ...] | None = None  # program-fixing; None: the settings'
    motion: bool = False


def calls() -> list[Call]:
    caption = lambda c: c.appearance.caption  # noqa: E731
    # Each call sets where its preview starts, whatever the base settings say.
    noise, ref = {"preview_from_reference": 0.0}, {"preview_from_reference": 1.0}
    off = {"ra_sa_until": 0.0}
    return [
        Call(lambda c: GENERIC_PROMPT, {**off, **noise}, {"preview": ROWS[0]}),
        Call(caption, {**off, **noise}, {"preview": ROWS[1], "frames": ROWS[3]},
             iba_layers=SELF),
        Call(caption, {**off, **noise}, {"frames": ROWS[4]}, iba_layers=SELF_CROSS),
        Call(caption, noise, {"preview": ROWS[2], "frames": ROWS[5]}),
        Call(caption, noise, {"frames": ROWS[6]}, motion=True),
        Call(caption, {**off, **ref}, {"preview": ROWS[7], "frames": ROWS[9]}, iba_layers=SELF),
        Call(caption, ref, {"preview": ROWS[8], "frames": ROWS[10]}),
        Call(caption, ref, {"frames": ROWS[11]}, motion=True),
    ]


def run_ablation(out: str | Path, models: Any, video_models: Any, settings: Any,
                 cases: list[tuple[str, Case, int]], log=print, model: str = ""
                 ) -> dict[str, Any]:
    """Animate every case with every call into `out` (npz per video, set.json), score the
    set, write `table.md` / `table.json` and one contact sheet per motion; returns the
    scored result. `models`: the toy family with its ControlNet; `video_models`: the same
    with the motion module inserted; `settings`: the AnimateSettings every row starts from.
    A stopped run resumes (finished videos are kept) only with the same `model` (its name, as
    the command was given it), settings and cases (`run.json`), else it stops with a
    ValueError before animating anything."""
    import time

    from freeanimate_jax.cli.eval import write
    from freeanimate_jax.eval.table import differences, markdown, score_set
    from freeanimate_jax.io import contact_sheet, read_video, write_png_atomic, write_video
    from freeanimate_jax.io.atomic import staged
    from freeanimate_jax.pipelines.animate import FreeAnimate

    out = Path(out)
    manifest = {"model": model, "settings": dataclasses.asdict(settings),
                "cases": [[name, case.to_dict(), seed] for name, case, seed in cases]}
    manifest = json.loads(json.dumps(manifest))  # tuples as lists, as read back
    if (out / "run.json").is_file() and json.loads((out / "run.json").read_text()) != manifest:
        raise ValueError(f"{out}: holds an ablation of another model, settings or cases "
                         f"(run.json); expected the same ones to resume, or a new --out")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    with staged(out / "run.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    spec_cases = {name: {"name": name, "case": case.to_dict(), "videos": {}}
                  for name, case, _ in cases}
    pipes: dict[tuple, FreeAnimate] = {}
    inputs: dict[Case, tuple[np.ndarray, np.ndarray]] = {}
    t0, ran = time.perf_counter(), 0
    todo = [(c, item) for c in calls() for item in cases]
    for i, (c, (name, case, seed)) in enumerate(todo):
        paths = {o: out / "videos" / f"{name}.{_slug(row)}.npz" for o, row in c.rows.items()}
        if not all(p.is_file() for p in paths.values()):  # a stopped ablation resumes
            key = (c.motion, c.iba_layers or settings.iba_layers)
            if key not in pipes:
                pipes[key] = FreeAnimate(video_models if c.motion else models,
                                         dataclasses.replace(settings, iba_layers=key[1]))
            if case not in inputs:  # every call and seed of a clip animates the same inputs
                inputs[case] = (case.reference(), case.poses())
            result = pipes[key](*inputs[case], c.prompt(case), seed=seed, **c.settings)
            for o, path in paths.items():
                write_video(path, getattr(result, o), 8.0)
            ran += 1
        for o, row in c.rows.items():
            spec_cases[name]["videos"][row] = str(paths[o].relative_to(out))
        eta = (time.perf_counter() - t0) / max(ran, 1) * (len(todo) - i - 1)
        log(f"[ablation] {i + 1}/{len(todo)} {'/'.join(c.rows.values())} {name} | "
            f"ETA {eta:.0f}s")
    spec = {"rows": list(ROWS), "cases": list(spec_cases.values())}
    with staged(out / "set.json") as tmp:
        tmp.write_text(json.dumps(spec, indent=1) + "\n")
    result = score_set(out)
    result["baseline"], result["differences"] = BASELINE, differences(result, BASELINE)
    write(result, out / "table.md", out / "table.json")
    by_motion: dict[str, tuple[str, Case]] = {}
    for name, case, _ in cases:
        by_motion.setdefault(case.motion, (name, case))
    for motion, (name, case) in by_motion.items():
        reference, poses = inputs.get(case) or (case.reference(), case.poses())
        columns = {"reference": reference, "truth": case.video(), "pose": poses}
        for row in ROWS:
            columns[row] = read_video(out / spec_cases[name]["videos"][row])[0]
        write_png_atomic(out / f"sheet-{motion}.png", contact_sheet(columns, rows=4))
    log(markdown(result))
    for row in ROWS:
        verdicts = {m: d["verdict"] for m, d in result["differences"][row].items()
                    if d["verdict"] != "within spread"}
        log(f"{row} vs {BASELINE}: {verdicts or 'within spread on every metric'}")
    return result


def _slug(row: str) -> str:
    keep = [ch if ch.isalnum() else "-" for ch in row.lower()]
    return "-".join(filter(None, "".join(keep).split("-")))
