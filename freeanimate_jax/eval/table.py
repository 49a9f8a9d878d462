"""An evaluation set, scored: `set.json` names toy-world cases and, per case, the videos of
each method (a table row); the ground truth of every case is rendered from the world, each
video scored with `metrics.evaluate`, and the rows summarised as mean and spread.

    {"rows": ["ControlNet alone", ...],              # the table's order (optional)
     "cases": [{"name": "a0-wave-s0",
                "case": {"appearance": {...}, "motion": "wave", "seed": 3, "frames": 16,
                         "size": 64},
                "videos": {"ControlNet alone": "a0-wave-s0/controlnet.npz", ...}}]}

Video paths are relative to the set's folder; `.npz` (our lossless frames) is best, anything
`freeanimate` reads works (an mp4's chroma subsampling costs a few Delta E on 64 px figures).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from freeanimate_jax.data.errors import DataError
from freeanimate_jax.eval import metrics
from freeanimate_jax.toy.data import Case

# What each column means, for the table's key (units and direction).
LABELS = {
    "l1": ("L1", "mean |pixel error|, 0-1, lower is better"),
    "psnr": ("PSNR", "dB, higher is better"),
    "ssim": ("SSIM", "0-1, higher is better"),
    "pose_iou": ("pose IoU", "figure mask vs truth, 0-1, higher is better"),
    "part_offset": ("part offset", "clothed parts' centroid error, fraction of the height, "
                    "lower is better"),
    "identity": ("identity dE", "Lab colour difference of shirt, trousers, skin to the "
                 "reference, lower is better"),
    "temporal_error": ("temporal err", "frame-to-frame change the truth lacks, lower is "
                       "better"),
    "flicker_ratio": ("flicker", "frame-to-frame change vs the truth's, 1 is the truth's"),
}


def read_set(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "set.json"
    if not path.is_file():
        raise DataError(f"{folder}: no set.json; expected an evaluation set (see "
                        f"freeanimate_jax/eval/table.py)")
    try:
        spec = json.loads(path.read_text())
        cases = spec["cases"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); expected JSON with a "
                        f"'cases' list") from None
    if not cases:
        raise DataError(f"{path}: no cases; expected at least one")
    for c in cases:
        for row, video in c.get("videos", {}).items():
            if not (folder / video).is_file():
                raise DataError(f"{path}: case {c.get('name')!r} row {row!r}: no file "
                                f"{folder / video}; expected the video the set names")
    return spec


def score_set(folder: str | Path) -> dict[str, Any]:
    """{"rows": [...], "per_video": [{case, row, metrics}], "summary": {row: {metric:
    (mean, std, n)}}}."""
    from freeanimate_jax.io.video import read_video

    folder = Path(folder)
    spec = read_set(folder)
    per_video = []
    for c in spec["cases"]:
        case = Case.from_dict(c["case"])
        truth, parts = case.video(), case.parts()
        colors = case.appearance.colors()
        for row, video in c["videos"].items():
            frames, _ = read_video(folder / video)
            if frames.shape != truth.shape:
                raise DataError(f"{folder / video}: frames of shape {frames.shape}; expected "
                                f"{truth.shape} (the case's frames and size)")
            per_video.append({"case": c.get("name", ""), "row": row,
                              "clip": json.dumps(c["case"], sort_keys=True),
                              "metrics": metrics.evaluate(frames, truth, parts, colors)})
    rows = list(spec.get("rows") or dict.fromkeys(v["row"] for v in per_video))
    summary, spread = {}, {}
    for row in rows:
        got = [v for v in per_video if v["row"] == row]
        summary[row] = {m: _stats([g["metrics"][m] for g in got]) for m in metrics.METRICS}
        spread[row] = {m: _seed_spread(got, m) for m in metrics.METRICS}
    return {"rows": rows, "per_video": per_video, "summary": summary, "seed_spread": spread}


def _seed_spread(videos: list[dict], metric: str) -> float | None:
    """The spread over seeds: the standard deviation of a metric across the videos of one
    clip (same appearance, motion and clip, other sampling seeds), averaged over clips; None
    where no clip has two seeds."""
    by_clip: dict[str, list[float]] = {}
    for v in videos:
        if math.isfinite(v["metrics"][metric]):
            by_clip.setdefault(v["clip"], []).append(v["metrics"][metric])
    stds = [float(np.std(x)) for x in by_clip.values() if len(x) > 1]
    return float(np.mean(stds)) if stds else None


def spread(result: dict[str, Any], row: str, metric: str) -> float:
    """The row's spread over seeds, or its standard deviation over videos where the set has
    one seed per clip."""
    s = result.get("seed_spread", {}).get(row, {}).get(metric)
    return result["summary"][row][metric][1] if s is None else s


def differences(result: dict[str, Any], base: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row against `base`, per metric: the difference of means, the threshold (twice
    the larger of the two rows' spreads over seeds) and the verdict: "better", "worse" or
    "within spread" (a difference counts only beyond the threshold)."""
    out = {}
    for row in result["rows"]:
        out[row] = {}
        for m in metrics.METRICS:
            delta = result["summary"][row][m][0] - result["summary"][base][m][0]
            limit = 2 * max(spread(result, row, m), spread(result, base, m))
            good = -delta if m not in metrics.HIGHER_IS_BETTER else delta
            if m == "flicker_ratio":  # 1 is the truth's: closer to 1 is better
                good = abs(result["summary"][base][m][0] - 1) - abs(
                    result["summary"][row][m][0] - 1)
            verdict = "within spread" if abs(delta) <= limit or not math.isfinite(delta) \
                else ("better" if good > 0 else "worse")
            out[row][m] = {"delta": delta, "threshold": limit, "verdict": verdict}
    return out


def _stats(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (float("inf") if values else float("nan"), 0.0, len(values))
    return (float(np.mean(finite)), float(np.std(finite)), len(values))


def markdown(result: dict[str, Any], columns: tuple[str, ...] = metrics.METRICS) -> str:
    """The summary as a markdown table: the mean over the row's videos ± `spread`."""
    head = "| method | n | " + " | ".join(LABELS[c][0] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for row in result["rows"]:
        s = result["summary"][row]
        n = s[columns[0]][2]
        cells = [f"{s[c][0]:.3f} ± {spread(result, row, c):.3f}" for c in columns]
        lines.append(f"| {row} | {n} | " + " | ".join(cells) + " |")
    key = "; ".join(f"{LABELS[c][0]}: {LABELS[c][1]}" for c in columns)
    text = "\n".join(lines) + f"\n\nMean ± spread over seeds. Columns: {key}.\n"
    if result.get("baseline"):  # with its `differences`, set where a row is the baseline
        base = result["baseline"]
        text += f"\nAgainst {base} (counted only beyond twice the larger spread over seeds):\n\n"
        for row, d in result["differences"].items():
            if row == base:
                continue
            said = [f"{verdict} on " + ", ".join(LABELS[m][0] for m in columns
                                                 if d[m]["verdict"] == verdict)
                    for verdict in ("better", "worse")
                    if any(d[m]["verdict"] == verdict for m in columns)]
            text += f"- {row}: {'; '.join(said) or 'within spread on every metric'}\n"
    return text
