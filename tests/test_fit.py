"""`freeanimate fit animate`: ahead-of-time per-chip HBM on an abstract TPU topology.

The tiny model family keeps the TPU compiles to seconds; the real SD 1.5 numbers are in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json

import pytest

from freeanimate_jax.cli.fit import main
from freeanimate_jax.config import load_job
from freeanimate_jax.fit import GiB
from freeanimate_jax.fit.generate import format_report as format_generate

pytest.importorskip("libtpu")


@pytest.mark.slow
def test_tiny_fits_on_v5e_4(capsys):
    rc = main(["animate", "--topology", "v5e-4", "--frames", "4", "--size", "64", "--tiny",
               "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["fits"] and report["verdict"].startswith("fits")
    assert report["chips"] == 4 and report["padded_frames"] == 4
    names = [st["name"] for st in report["stages"]]
    assert names == ["text encoder", "VAE encode", "reference inversion", "preview start",
                     "preview", "preview inversion", "denoise", "VAE decode"]
    for st in report["stages"]:
        assert st["error"] is None and st["fits"], st
        assert st["args"] > 0 and st["outputs"] > 0 and st["total"] > 0, st
        assert st["total"] == st["args"] + st["temps"] + st["outputs"] - st["alias"]
        assert st["total"] <= st["peak"] < report["hbm_bytes"]
    assert report["hbm_bytes"] == int(15.75 * GiB)
    cache = report["cache"]
    # The analytic cache size is exactly what the compiled preview inversion hands to denoise.
    assert cache["mode"] == "hidden" and cache["layers"]
    assert cache["bytes_per_chip"] == cache["bytes_per_chip_compiled_shapes"] > 0
    per = cache["bytes_per_frame_step"]
    assert per["maps"] > per["hidden"] > per["recompute"] > 0


def test_bad_topology_is_one_line_exit_2(capsys):
    assert main(["animate", "--topology", "v7x-9000", "--tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "v7x-9000" in err[0] and "v5e-8" in err[0]


@pytest.mark.parametrize("argv", [["animate", "animate.steps=2", "bogus=1"], ["banana"],
                                  ["animate", "animate.cache_mode=disk"],
                                  ["animate", "--size", "100"],
                                  ["animate", "--stages", "everything"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_settings_parse_by_field_type():
    # fit reads settings through the run commands' own loader and keys.
    s = load_job(None, ["animate.cache_mode=recompute", "animate.steps=10",
                        "animate.iba_until=0.5",
                        "animate.iba_layers=[up_blocks.2.*.attn1, up_blocks.3.*.attn1]",
                        "animate.clip_skip=null"]).settings()
    assert s.cache_mode == "recompute" and s.steps == 10 and s.iba_until == 0.5
    assert s.iba_layers == ("up_blocks.2.*.attn1", "up_blocks.3.*.attn1") and s.clip_skip is None
    assert load_job(None, ["animate.clip_skip=2"]).settings().clip_skip == 2


@pytest.mark.slow
def test_over_budget_exits_1(capsys):
    # A deliberately tiny HBM budget: the compile succeeds, our check refuses.
    rc = main(["animate", "--topology", "v5e-1", "--frames", "4096", "--size", "64", "--tiny",
               "--hbm-gib", "0.001", "--stages", "text encoder"])
    out = capsys.readouterr().out
    assert rc == 1 and "does not fit: text encoder" in out and "GiB over" in out


@pytest.mark.slow
def test_compiler_hbm_overflow_exits_1(capsys):
    # maps mode keeps every step's fp32 softmax maps: thousands of frames overflow one v5e chip
    # for real, and the TPU compiler's refusal is reported as "does not fit".
    rc = main(["animate", "--topology", "v5e-1", "--frames", "4096", "--size", "64", "--tiny",
               "--json", "--stages", "preview inversion", "animate.cache_mode=maps"])
    report = json.loads(capsys.readouterr().out)
    (st,) = report["stages"]
    assert rc == 1 and not report["fits"] and not st["fits"]
    assert st["error"].startswith("does not fit: ") and "HBM" in st["error"]
    assert report["verdict"].startswith("does not fit: preview inversion")


def _generate(argv: list[str], capsys) -> tuple[int, dict]:
    rc = main(["generate", "--tiny", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_tiny_generate_fits_on_v5e_4(capsys):
    rc, report = _generate(["--topology", "v5e-4", "--frames", "8", "--size", "64"], capsys)
    assert rc == 0 and report["fits"] and report["pipeline"] == "generate"
    assert [st["name"] for st in report["stages"]] == ["text encoder", "denoise", "VAE decode"]
    for st in report["stages"]:
        assert st["error"] is None and st["fits"] and st["args"] > 0 and st["outputs"] > 0, st
        assert st["total"] <= st["peak"] < report["hbm_bytes"]
    assert report["motion"] == "v3" and report["windows"] == 1
    assert 0 < report["motion_params"] < report["unet_params"]
    # The denoise scan holds the UNet (bf16, replicated) and this chip's 2 of 8 latents.
    denoise = report["stages"][1]
    assert denoise["args"] >= 2 * report["unet_params"]


@pytest.mark.slow
def test_generate_layouts_and_controlnet_change_the_program(capsys):
    common = ["--topology", "v5e-4", "--frames", "4", "--size", "64", "--stages", "denoise"]
    _, v3 = _generate(common, capsys)
    _, v2 = _generate([*common, "--motion", "v2", "--controlnet"], capsys)
    assert v2["motion_params"] > v3["motion_params"]  # v2's mid-block module
    assert v2["stages"][0]["args"] > v3["stages"][0]["args"]  # + the ControlNet's weights
    assert "openpose ControlNet" in format_generate(v2)


@pytest.mark.slow
def test_long_generate_with_context_windows_fits(capsys):
    # 40 frames exceed the 32-position table: windows of 16 make it run, frames still sharded.
    rc, report = _generate(["--topology", "v5e-8", "--frames", "40", "--size", "64",
                            "--stages", "denoise", "generate.context_length=16"], capsys)
    assert rc == 0 and report["fits"] and report["windows"] == 7


@pytest.mark.parametrize("argv", [
    ["generate", "--tiny", "--motion", "v9"],
    ["generate", "--tiny", "--topology", "v5e-4", "--frames", "6"],  # 6 frames over 4 chips
    ["generate", "--tiny", "--topology", "v5e-4", "--frames", "40"],  # > 32 positions
    ["generate", "--tiny", "frames=4"],
    ["generate", "--tiny", "--stages", "preview"],
    ["animate", "--tiny", "--motion", "v2"]])
def test_bad_generate_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("freeanimate fit: "), err
