"""`freeanimate fit train`: the trainer's own step compiled ahead of time for a TPU topology
(the tiny family at 64 px keeps each compile to well under a minute), the largest batch per
chip found by bisection, and the FLOP count the floor comes from."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freeanimate_jax.cli.fit import main
from freeanimate_jax.fit import flops
from freeanimate_jax.fit.core import GiB
from freeanimate_jax.fit.train import largest_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Try:
    def __init__(self, ok: bool):
        self.ok = ok


@pytest.mark.parametrize("limit,fits_up_to", [(64, 5), (64, 1), (64, 0), (8, 8), (8, 64),
                                              (64, 33), (1, 1)])
def test_largest_batch_bisects(limit, fits_up_to):
    calls = []

    def attempt(b):
        calls.append(b)
        return _Try(b <= fits_up_to)

    best, tried = largest_batch(attempt, limit)
    assert best == min(fits_up_to, limit)
    assert len(calls) == len(set(calls)) == len(tried)  # nothing compiled twice
    assert max(calls) <= limit
    assert len(calls) <= 2 * max(1, limit).bit_length() + 1  # logarithmic


def test_flop_count_equals_xla_on_matmuls_and_convolutions():
    """Independent reference: XLA's own cost analysis of the same program on the CPU, for the
    two kinds of operations the counter reads (dense layers and 3x3 convolutions, forward and
    backward, inside a scan)."""
    w = jnp.full((3, 3, 8, 8), 0.01)
    m = jnp.ones((8, 32))

    def body(h, _):
        # zero padding as its own op: XLA counts a padded convolution's in-bounds taps only
        h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h = jnp.tanh(jax.lax.conv_general_dilated(
            h, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return h, jnp.sum(jnp.tanh(h @ m))

    def scanned(x):
        return jnp.sum(jax.lax.scan(body, x, None, length=3)[1])

    def unrolled(x):
        total = 0.0
        for _ in range(3):
            x, y = body(x, None)
            total = total + y
        return total

    x = jnp.ones((2, 10, 12, 8))
    conv = 2 * (2 * 10 * 12 * 8) * 8 * 9  # (output elements) x (input channels x taps) x 2
    conv_grad = 2 * (2 * 12 * 14 * 8) * 8 * 9  # onto the padded input, 12 x 14
    dense = 2 * (2 * 10 * 12 * 32) * 8
    # per step: forward conv + dense; backward their input-gradients (w and m are constants)
    expected = 3 * (conv + conv_grad + 2 * dense)
    for f in (scanned, unrolled):
        assert flops.count(jax.jit(jax.grad(f)).trace(x).jaxpr) == expected, f.__name__
    # XLA's own count, where its convention is the same (no loop, whose body it counts once;
    # no padded convolution, whose out-of-bounds taps it leaves out), plus its element-wise ops.
    def forward(x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(y) @ m

    ours = flops.count(jax.jit(forward).trace(x).jaxpr)
    assert ours == 2 * (2 * 8 * 10 * 8) * 8 * 9 + 2 * (2 * 8 * 10 * 32) * 8
    xla = jax.jit(forward).lower(x).cost_analysis()
    assert ours <= xla["flops"] <= 1.05 * ours, (xla["flops"], ours)


pytest.importorskip("libtpu")


# The trained state replicated whatever the budget (`auto` would shard it under a small one:
# another program).
TINY = ["train", "--topology", "v5e-4", "--tiny", "--frames", "8", "--remat", "none", "--json",
        "data.source=latents", "train.state_sharding=replicate"]


@pytest.mark.slow
def test_fit_train_tiny_fits_and_does_not_fit_and_finds_the_largest_batch(capsys):
    """Batch 1 with no room (exit 1); then with exactly batch 1's total as the budget, the
    search finds 1: batch 2 holds more (its clips and their activations) and does not fit."""
    rc = main([*TINY, "--batch", "1", "--hbm-gib", "0.001"])
    one = json.loads(capsys.readouterr().out)
    assert rc == 1 and not one["fits"] and one["verdict"].startswith("does not fit")
    (row,) = one["rows"]
    assert row["error"] is None and not row["fits"] and row["total"] > 0.001 * GiB
    assert row["weights"] > 0 and row["optimizer"] > 0 and row["batch"] > 0
    assert row["activations"] > 0 and row["total"] >= row["weights"] + row["optimizer"]

    budget = (row["total"] + 64) / GiB  # whole bytes through a float: a little over
    rc = main([*TINY, "--max-batch", "8", "--hbm-gib", repr(budget)])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["fits"], r["verdict"]
    rows = r["rows"]
    assert [x["batch_per_chip"] for x in rows] == [1, 2]  # doubling stops at the first miss
    assert r["largest_batch_per_chip"] == {"none": 1}
    assert [x["fits"] for x in rows] == [True, False]
    assert rows[0]["total"] == row["total"]  # the same program compiled again
    assert rows[1]["total"] > rows[0]["total"]
    assert rows[1]["weights"] == rows[0]["weights"]
    assert rows[1]["optimizer"] == rows[0]["optimizer"]
    assert rows[1]["batch"] > rows[0]["batch"]
    assert r["flops_per_clip"] > 0
    assert r["step_floor_s"]["none"] == pytest.approx(r["flops_per_clip"] * 1 / 197e12)


@pytest.mark.parametrize("argv", [["train", "--remat", "sometimes", "--tiny"],
                                  ["train", "--tiny", "--batch", "0"],
                                  ["train", "--tiny", "data.frames=8"],
                                  ["train", "--tiny", "train.motion=none"],
                                  ["animate", "--remat", "full", "--tiny"]])
def test_fit_train_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_fit_train_counts_what_the_trainer_trains():
    """The FLOP count comes from the trainer's step: more frames, more FLOPs, in proportion
    for everything but the motion modules' frame-quadratic attention."""
    from freeanimate_jax import config as cfg
    from freeanimate_jax.fit.train import flops_per_clip

    job = cfg.load_job(None, ["data.source=latents"], base=cfg.DEMO_TRAIN_CONFIG,
                       schema=cfg.TrainJob)
    four, eight = (flops_per_clip(job, f, (64, 64), "float32") for f in (4, 8))
    assert 1.9 < eight / four < 2.2
    assert np.isfinite(four) and four > 1e8


def test_fit_train_lowers_a_vae_runbook_as_the_trainer_runs_it(tmp_path):
    """The toy VAE's runbook: the step trains the VAE on pixels alone (no frozen encoders,
    no text), and what fit lowers is that step, with that batch."""
    from freeanimate_jax import config as cfg
    from freeanimate_jax.fit.train import flops_per_clip, step_program
    from freeanimate_jax.parallel import data_mesh
    from freeanimate_jax.toy.family import init_family

    fam = init_family(tmp_path / "family")
    job = cfg.load_job(str(CONFIGS / "toy_vae.yaml"), [f"model={fam}"], schema=cfg.TrainJob)
    p, _ = step_program(job, "float32", data_mesh(jax.devices("cpu")[:1]), None)
    assert p.encoder_graphs is None and p.cfg.objective == "vae"
    _, batch, _, encoders = p.abstract_args(2, 1, (64, 64))
    assert set(batch) == {"pixels"} and encoders is None
    # 2 frames cost twice 1 (frames are images to the VAE).
    one, two = (flops_per_clip(job, f, (64, 64), "float32") for f in (1, 2))
    assert one > 1e8 and two / one == pytest.approx(2, rel=0.05)
