"""The TPU notebook runs top to bottom on a CPU with the tiny family (FREEANIMATE_TINY=1)."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "freeanimate_tpu.ipynb"


@pytest.mark.slow
def test_tpu_notebook_runs_on_cpu_with_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEANIMATE_TINY", "1")
    monkeypatch.chdir(tmp_path)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    scope: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}", "exec"), scope)
    assert scope["result"].frames.shape == (8, 64, 64, 3)
    assert (tmp_path / "outputs" / "notebook.mp4").stat().st_size > 0
