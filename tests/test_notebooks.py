"""Every notebook runs top to bottom in a Jupyter kernel (nbclient), on the CPU with its tiny
switch (FREEANIMATE_TINY=1), as a Colab or Kaggle user runs it on a TPU: the same cells, the
install cell included (with the package installed already, it installs nothing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from freeanimate_jax.io import read_video

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _run(name: str, cwd: Path) -> list[str]:
    """Execute notebooks/`name` in `cwd`; the text every code cell printed, in order."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {"FREEANIMATE_TINY": "1", "JAX_PLATFORMS": "cpu"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ["".join(o.get("text", "") for o in c.get("outputs", []) if o.get("name") == "stdout")
            for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_tested():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {
        "animate.ipynb", "generate.ipynb", "train.ipynb"}


@pytest.mark.parametrize("name", ["animate.ipynb", "generate.ipynb", "train.ipynb"])
def test_the_install_cell_installs_from_the_repository_url(name):
    cells = nbformat.read(NOTEBOOKS / name, as_version=4).cells
    code = [c.source for c in cells if c.cell_type == "code"]
    assert code[0].splitlines()[0] == "import os"
    assert 'REPO_URL = "https://' in code[0] and "FREEANIMATE_TINY" in code[0]
    assert "git+{REPO_URL}" in code[1] and '"pip", "install"' in code[1]
    assert "import freeanimate_jax" in code[1]  # installed already: nothing to do


@pytest.mark.slow
def test_animate_notebook(tmp_path):
    _run("animate.ipynb", tmp_path)
    frames, _ = read_video(tmp_path / "outputs" / "animate.mp4")
    assert frames.shape == (8, 64, 64, 3)
    assert frames.std() > 0


@pytest.mark.slow
def test_generate_notebook(tmp_path):
    printed = _run("generate.ipynb", tmp_path)
    frames, _ = read_video(tmp_path / "outputs" / "generate.mp4")
    assert frames.shape == (8, 64, 64, 3)
    score = float(printed[-1].split("frame difference):")[1].split()[0])
    assert 0 < score < 1


@pytest.mark.slow
def test_train_notebook(tmp_path):
    printed = _run("train.ipynb", tmp_path)
    run = tmp_path / "runs" / "motion-notebook"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert all(np.isfinite(x["loss"]) for x in lines)
    assert (run / "checkpoints" / "30").is_dir()  # the last step's checkpoint is complete
    assert any(p.suffix == ".mp4" for p in (run / "val").rglob("*"))
    export = tmp_path / "outputs" / "my-motion-adapter"
    assert (export / "config.json").exists()
    assert "(8, 64, 64, 3) motion score" in printed[-1]
