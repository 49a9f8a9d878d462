"""`freeanimate eval`: score an evaluation set of toy-world videos against the world's ground
truth and write the table (markdown) and every video's metrics (JSON).

    freeanimate eval SET_DIR --out table.md [--json metrics.json]

SET_DIR holds `set.json` (the format: `freeanimate_jax/eval/table.py`). The ablation of
docs/QUALITY.md writes such a set and scores it with the same code (`freeanimate toy
ablation`). Nothing is written unless every video was read and scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "freeanimate eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Score toy-world videos against the "
                                "world's ground truth: L1, PSNR, SSIM, pose, identity, flicker.")
    p.add_argument("set", metavar="SET_DIR", help="a folder with set.json and the videos")
    p.add_argument("--out", required=True, metavar="TABLE.md", help="the markdown table")
    p.add_argument("--json", metavar="FILE", help="every video's metrics and the summary "
                   "(default: the table's path with .json)")
    return p


def write(result: dict, out: Path, json_out: Path) -> None:
    from freeanimate_jax.eval.table import markdown
    from freeanimate_jax.io.atomic import write_files_atomic

    for path in (out, json_out):
        path.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    data = json.dumps(result, indent=1, default=float) + "\n"
    write_files_atomic([(out, lambda p: p.write_text(text)),
                        (json_out, lambda p: p.write_text(data))])


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from freeanimate_jax.cli.run import EXIT_BAD_INPUT
    from freeanimate_jax.data.errors import DataError
    from freeanimate_jax.eval.table import score_set
    from freeanimate_jax.io import InputError

    out = Path(args.out)
    json_out = Path(args.json) if args.json else out.with_suffix(".json")
    if out.suffix.lower() != ".md":
        print(f"{PROG}: error: --out {out} is not a .md file; expected a markdown table path",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = score_set(args.set)
    except (DataError, InputError, ValueError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from freeanimate_jax.eval.ablation import BASELINE
    from freeanimate_jax.eval.table import differences

    if BASELINE in result["rows"]:  # an ablation's set: its verdicts, as the ablation wrote
        result["baseline"], result["differences"] = BASELINE, differences(result, BASELINE)
    write(result, out, json_out)
    print(f"scored {len(result['per_video'])} videos in {len(result['rows'])} rows: {out}, "
          f"{json_out}")
    return 0
