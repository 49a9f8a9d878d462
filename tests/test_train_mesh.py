"""Training on a mesh, as `freeanimate train run` runs it: 1 device, 8 devices, and 2 processes
x 4 devices (jax.distributed over gloo, as run_tpu.sh starts a pod) give the same losses, the
same gradients at every step and the same parameter updates, with the trained state replicated
or sharded over `data`; the 8-device run's checkpoint resumes on 1 device and on 2 processes
with the same next losses.

Gradients are compared through the checkpoints of every step: AdamW's first moment after step
k is b1 m_{k-1} + (1 - b1) g_k, so equal moments at every step are equal clipped gradients."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freeanimate_jax import config as cfg
from freeanimate_jax.train.checkpoint import Checkpoints
from freeanimate_jax.train.state import path_name
from tests.helpers import free_port, process_env

STEPS = 5
# Adam's eps is 1e-6 here, not 1e-8: the summed gradient of an element whose per-example terms
# cancel (the first steps after the zero init, ~1e-8 against a leaf median of 7e-7) moves by
# summation order (5% measured), and with eps 1e-8 Adam divides that noise by the element's own
# size into a step of ~lr. Measured with eps 1e-8: every moment check below passed at 1e-5, the
# parameter updates were 3.6e-5 apart. With eps 1e-6 the update's sensitivity to an absolute
# gradient error is at most lr / eps, and the same code path is compared at 1e-5.
ARGS = ["optim.eps=1e-6", "train.max_steps=5", "train.global_batch=8", "train.ckpt_every=1",
        "train.ckpt_keep=5", "train.log_every=1", "val.every=0", "train.tensorboard=false",
        "data.frames=4", "data.synthetic_videos=16"]
REL = 1e-5




def train(out, *extra: str, devices: int = 1, processes: int = 1,
          resume_from: int | None = None) -> list[str]:
    """Run `freeanimate train run` on `processes` x `devices`; every process's stdout."""
    flags = [] if resume_from is None else ["--resume-from", str(resume_from)]
    # One compilation cache for the module: a resumed run reuses its device count's program.
    cmd = [sys.executable, "-m", "freeanimate_jax", "train", "run", "--demo", *flags,
           f"train.output_dir={out}", f"compilation_cache={out.parent / 'xla_cache'}",
           *ARGS, *extra]
    if processes == 1:
        procs = [subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=process_env(devices))]
    else:
        port = free_port()
        procs = [subprocess.Popen(
            cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=process_env(devices, FREEANIMATE_DISTRIBUTED="1",
                     JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                     JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
            for i in range(processes)]
    logs = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"{stdout}\n{stderr}"
    return [stdout for stdout, _ in logs]


def _lines(out) -> dict[int, dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines}


def _saved(out, step: int) -> dict[str, np.ndarray]:
    """Trained params (`params.*`) and optimizer state (`opt.*`) of a checkpoint."""
    ckpt = Checkpoints(out / "checkpoints", keep=STEPS, asynchronous=False)
    try:  # on this process's device, whatever devices or hosts wrote it (as export reads it)
        raw = {item: ckpt.read(step, item) for item in ("params", "opt")}
    finally:
        ckpt.close()
    return {f"{item}.{path_name(p)}": np.asarray(v, np.float32) for item in ("params", "opt")
            for p, v in jax.tree_util.tree_leaves_with_path(raw[item])}


def _initial() -> dict[str, np.ndarray]:
    """The trained parameters before step 1 (the zero-initialised module of the demo job)."""
    from freeanimate_jax.train.loop import build_models
    from freeanimate_jax.train.state import split

    job = cfg.load_job(None, [*ARGS, "compilation_cache="], base=cfg.DEMO_TRAIN_CONFIG,
                       schema=cfg.TrainJob)
    _, trained, _ = split(build_models(job, jnp.float32).unet, job.sections()[3].trainable)
    return {f"params.{path_name(p)}": np.asarray(v, np.float32)
            for p, v in jax.tree_util.tree_leaves_with_path(trained)}


def _rel(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
    """The relative error ||a - b|| / ||scale|| of a leaf (2-norms: a sum over the batch in
    another order moves single elements by float rounding, a sum-vs-mean bug moves the whole
    leaf); a zero scale asks for a == b exactly."""
    err, size = float(np.linalg.norm(a - b)), float(np.linalg.norm(scale))
    return err / size if size else (0.0 if err == 0 else float("inf"))


def _same_run(ours, ref, init: dict[str, np.ndarray], steps=range(1, STEPS + 1)) -> None:
    """Equal losses and grad norms, equal Adam moments (gradients) at every step, and equal
    parameter updates after the last, each relative to its size."""
    a, b = _lines(ours), _lines(ref)
    for s in steps:
        for key in ("loss", "grad_norm"):
            assert abs(a[s][key] - b[s][key]) <= REL * abs(b[s][key]), (s, key, a[s], b[s])
        assert a[s]["indices"] == b[s]["indices"], s
        sa, sb = _saved(ours, s), _saved(ref, s)
        assert sa.keys() == sb.keys()
        moments = [n for n in sb if n.startswith("opt.") and ".mu." in f".{n}."]
        # Each moment leaf against the step's whole first moment: a gradient reduced over 8
        # devices sums its terms in another order, which moves a leaf whose terms cancel (a
        # norm weight's) by more than its own size times 1e-5, but nothing near the scale of
        # the gradient; a lost or doubled device contribution moves whole leaves.
        scale = np.concatenate([sb[n].ravel() for n in moments])
        for name in moments:
            assert _rel(sa[name], sb[name], scale) <= REL, (s, name)
        # From zero init only proj_out has a gradient at step 1; later every leaf has one.
        assert any(np.any(sb[n]) for n in moments)
        assert s < 3 or all(np.any(sb[n]) for n in moments), s
    sa, sb = _saved(ours, STEPS), _saved(ref, STEPS)
    moved = 0
    updates = np.concatenate([(sb[n] - start).ravel() for n, start in init.items()])
    for name, start in init.items():
        delta = sb[name] - start
        moved += bool(np.any(delta))
        # The parameters' difference (= the difference of their updates) against the size of
        # the whole update, <= 1e-5 (see ARGS for Adam's eps).
        assert _rel(sa[name] - start, delta, updates) <= REL, name
    assert moved == len(init), "every trained leaf moves (weight decay is 0 in the demo)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    out = {"one": root / "one", "eight": root / "eight", "two_hosts": root / "two_hosts"}
    logs = {"one": train(out["one"], devices=1),
            "eight": train(out["eight"], devices=8),
            "two_hosts": train(out["two_hosts"], "train.state_sharding=data", devices=4,
                               processes=2)}
    return out, logs, _initial()


@pytest.mark.slow
def test_eight_devices_train_as_one(runs):
    out, logs, init = runs
    assert "on 1 device(s), trained state replicated" in logs["one"][0]
    assert "on 8 device(s), trained state replicated" in logs["eight"][0]
    _same_run(out["eight"], out["one"], init)


@pytest.mark.slow
def test_two_processes_with_the_state_sharded_over_data_train_as_one(runs):
    out, logs, init = runs
    for log in logs["two_hosts"]:
        assert "on 8 device(s) (2 processes), trained state sharded over data" in log
    # Process 0 alone writes the metrics; both wrote the checkpoints' shards together.
    _same_run(out["two_hosts"], out["one"], init)


@pytest.mark.slow
def test_the_8_device_checkpoint_resumes_on_1_device_and_on_2_processes(runs):
    out, _, init = runs
    # The replicated checkpoint restores into the sharded layout too.
    for name, extra, kw in (("resumed_one", (), dict(devices=1)),
                            ("resumed_two", ("train.state_sharding=data",),
                             dict(devices=4, processes=2))):
        folder = out["eight"].parent / name
        shutil.copytree(out["eight"], folder)
        logs = train(folder, *extra, resume_from=3, **kw)
        assert all("resumed from the checkpoint of step 3" in log for log in logs)
        _same_run(folder, out["eight"], init, steps=range(4, STEPS + 1))
