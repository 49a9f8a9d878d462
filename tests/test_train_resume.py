"""Resume, end to end through `freeanimate train run --demo` processes: a run killed with
SIGKILL mid-interval, one killed during an async save, one stopped with SIGTERM and one
restarted with `--resume-from` all continue from a complete checkpoint (never a partial one)
and end with per-step losses, data indices, timesteps and final parameters bitwise equal to
an uninterrupted run's.

Every process shares one persistent compilation cache (filled by the uninterrupted run), so
the restarts skip the ~20-40 s first-step compile; the cached programs are the ones compiled."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3
OVERRIDES = (f"train.max_steps={STEPS}", f"train.ckpt_every={EVERY}", "train.ckpt_keep=10",
             "val.every=0", "train.log_every=1", "train.tensorboard=false",
             "data.synthetic_videos=16")
TIMEOUT = 300  # seconds per process, generous for a loaded 2-core machine
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# What a step does that must not change across a restart (s_per_step etc. are timings).
EXACT = ("step", "loss", "grad_norm", "lr", "indices", "t")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "FREEANIMATE_TEST_PAUSE_SAVE")}  # conftest's 8 devices
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}


class Run:
    """A `train run` process, stdout and stderr merged, read line by line in a thread."""

    def __init__(self, command: list[str], cwd: Path, **env: str):
        self.proc = subprocess.Popen(command, cwd=cwd, env=_env(**env), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.done = False
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    @property
    def output(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The first line matching `pattern` (a regex, from the line's start)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = next((x for x in self.lines if re.match(pattern, x)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    break
                self.cond.wait(left)
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.finish()

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}"
                                 ) from None
        self.reader.join(30)
        return rc


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """`launch(out, *extra, **env)`: start `freeanimate train run --demo` for `out` (the same
    argv for a run and its restarts)."""
    cache = tmp_path_factory.mktemp("compilation_cache")
    cwd = tmp_path_factory.mktemp("cwd")

    def start(out: Path, *extra: str, **env: str) -> Run:
        command = [sys.executable, "-m", "freeanimate_jax", "train", "run", "--demo",
                   f"train.output_dir={out}", f"compilation_cache={cache}", *OVERRIDES, *extra]
        return Run(command, cwd, **env)

    return start


def _complete(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _partial(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if p.name.endswith(TMP_SUFFIX))


def _per_step(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(x)[k] for k in EXACT} for x in lines if x.strip()]


def _final_state(run_dir: Path) -> dict[str, np.ndarray]:
    """Every leaf of the `params` and `opt` items of the last checkpoint, by path."""
    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.fspath(run_dir / "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step()
        assert step == STEPS, f"latest checkpoint {step}, expected {STEPS}"
        out = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return {f"{item}{jax.tree_util.keystr(path)}": np.asarray(leaf)
            for item in ("params", "opt")
            for path, leaf in jax.tree_util.tree_leaves_with_path(out[item])}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, launch):
    """Run A: 12 steps in one go; its folder, per-step records and final state."""
    out = tmp_path_factory.mktemp("run_a")
    run = launch(out)
    rc = run.finish()
    assert rc == 0, run.output[-4000:]
    assert "resumed" not in run.output
    assert _complete(out) == list(range(EVERY, STEPS + 1, EVERY)) and not _partial(out)
    records = _per_step(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    state = _final_state(out)
    assert any(k.startswith("params") for k in state)
    return out, records, state


def _assert_equals_uninterrupted(run_dir: Path, uninterrupted) -> None:
    _, records, state = uninterrupted
    ours = _per_step(run_dir)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # truncated, rewritten
    for mine, ref in zip(ours, records, strict=True):
        assert mine == ref, f"step {ref['step']}: {mine} != uninterrupted {ref}"  # bitwise
    final = _final_state(run_dir)
    assert final.keys() == state.keys()
    for name, ref in state.items():
        assert final[name].dtype == ref.dtype, name
        assert np.array_equal(final[name], ref), f"{name} differs from the uninterrupted run"
    assert not _partial(run_dir)


def _resumed(run: Run, step: int) -> None:
    assert run.wait_for(r"resumed from") == f"resumed from the checkpoint of step {step}"


def _wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sigkill_mid_interval_resumes_from_the_last_complete_checkpoint(
        tmp_path, launch, uninterrupted):
    out = tmp_path / "run_b"
    run = launch(out)
    run.wait_for(rf"step 7/{STEPS} ")
    # The async save of step 6 may still be committing when step 7 prints: let it land (the
    # save of step 9 waits for it, so this is still mid-interval), then kill.
    _wait_until(lambda: (out / "checkpoints" / "6").is_dir())
    assert run.kill() == -signal.SIGKILL
    assert _complete(out) == [3, 6]
    assert len(_per_step(out)) >= 7  # lines past the checkpoint, to be rewritten

    again = launch(out)
    _resumed(again, 6)
    assert again.finish() == 0, again.output[-4000:]
    assert f"step 6/{STEPS} " not in again.output and f"step 7/{STEPS} " in again.output
    assert _complete(out) == [3, 6, 9, 12]
    _assert_equals_uninterrupted(out, uninterrupted)


def test_sigkill_during_an_async_save_never_picks_up_the_partial_checkpoint(
        tmp_path, launch, uninterrupted):
    out = tmp_path / "run_c"
    run = launch(out, FREEANIMATE_TEST_PAUSE_SAVE="9")
    assert run.wait_for(r"paused saving") == "paused saving step 9"
    assert run.kill() == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / f"9{TMP_SUFFIX}").is_dir()
    assert not (checkpoints / "9").exists()
    assert _complete(out) == [3, 6]

    again = launch(out)
    _resumed(again, 6)
    assert again.finish() == 0, again.output[-4000:]
    assert not (checkpoints / f"9{TMP_SUFFIX}").exists()
    assert _complete(out) == [3, 6, 9, 12]
    _assert_equals_uninterrupted(out, uninterrupted)


def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(tmp_path, launch, uninterrupted):
    out = tmp_path / "run_d"
    run = launch(out)
    run.wait_for(rf"step 5/{STEPS} ")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.output[-4000:]
    saved = int(re.match(r"SIGTERM: saved step (\d+);", run.wait_for(r"SIGTERM")).group(1))
    assert saved in (5, 6)
    assert _complete(out) == sorted({3, saved}) and not _partial(out)
    assert [r["step"] for r in _per_step(out)] == list(range(1, saved + 1))
    assert f"step {saved + 1}/{STEPS} " not in run.output
    assert run.wait_for(r"done:").startswith(f"done: step {saved}, ")

    again = launch(out)
    _resumed(again, saved)
    assert again.finish() == 0, again.output[-4000:]
    assert _complete(out) == sorted({3, saved, 6, 9, 12})
    _assert_equals_uninterrupted(out, uninterrupted)


def test_resume_from_an_earlier_step_equals_the_uninterrupted_run(
        tmp_path, launch, uninterrupted):
    out = tmp_path / "run_e"
    shutil.copytree(uninterrupted[0], out)
    run = launch(out, "--resume-from", "3")
    _resumed(run, 3)
    assert run.wait_for(r"deleted the later").startswith(
        "deleted the later checkpoints (steps [6, 9, 12])")  # rewritten, not refused
    assert run.finish() == 0, run.output[-4000:]
    assert f"step 4/{STEPS} " in run.output and f"step 3/{STEPS} " not in run.output
    assert _complete(out) == [3, 6, 9, 12]
    _assert_equals_uninterrupted(out, uninterrupted)
