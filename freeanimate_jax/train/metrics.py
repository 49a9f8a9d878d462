"""Where a run's numbers go: one JSON line per step (`metrics.jsonl`, the record tests and
tools read), TensorBoard event files through tensorboardX (when installed), wandb (optional),
and a progress line with the ETA."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from freeanimate_jax.io.atomic import staged

# Peak dense bf16 FLOP/s per chip, for MFU (datasheet values; None: not logged).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def peak_flops(device_kind: str) -> float | None:
    for name, value in PEAK_FLOPS.items():
        if device_kind.startswith(name) or name in device_kind:
            return value
    return None


def run_folder(output_dir: str) -> Path:
    """`train.output_dir` as an absolute local folder (orbax refuses relative paths); a URL is
    refused in one line: a bucket is mounted as a folder (gcsfuse: `run_tpu.sh --out gs://...`
    mounts it on every worker), since every file of a run is written there atomically."""
    from freeanimate_jax.config import ConfigError

    if "://" in output_dir:
        raise ConfigError(f"train.output_dir={output_dir!r}: a URL; expected a folder (mount a "
                          f"bucket with gcsfuse, as run_tpu.sh --out gs://... does)")
    return Path(output_dir).expanduser().absolute()


def truncate_jsonl(path: Path, before_step: int) -> None:
    """Keep the lines of steps before `before_step` (a resumed run rewrites the rest), as one
    atomic replacement."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed run (SIGKILL, a preempted host)
        if record.get("step", 0) <= before_step:
            kept.append(line)
    with staged(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


class Writers:
    """JSONL always; TensorBoard and wandb when asked for and installed. Only the `primary`
    process of a multi-host run writes (the others' writers do nothing)."""

    def __init__(self, folder: Path, *, tensorboard: bool, wandb: bool, config: dict,
                 primary: bool = True):
        self.jsonl = self.tb = self.wb = None
        if not primary:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(folder / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("tensorboardX is not installed: no TensorBoard events (pip install "
                      "'freeanimate-jax[train]')", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(folder / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                print("wandb is not installed: no wandb run", file=sys.stderr)
            else:
                self.wb = wb.init(project="freeanimate-jax", config=config,
                                  dir=str(folder), resume="allow")

    def step(self, record: dict[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        finite = {k: v for k, v in values.items() if isinstance(v, int | float)
                  and math.isfinite(v)}
        if self.tb is not None:
            for k, v in finite.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(finite, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def progress_line(step: int, total: int, loss: float, s_per_step: float, clips_per_s: float,
                  mfu: float | None) -> str:
    eta = max(0, total - step) * s_per_step
    h, rem = divmod(int(eta), 3600)
    tail = f" | MFU {mfu:.1%}" if mfu is not None else ""
    return (f"step {step}/{total} | loss {loss:.4f} | {s_per_step:.3f} s/step | "
            f"{clips_per_s:.2f} clips/s{tail} | ETA {h}:{rem // 60:02d}:{rem % 60:02d}")

