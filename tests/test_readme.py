"""The README's Python example runs as written, against a local folder named like the hub id
(a local folder shadows a hub id, as in diffusers)."""

import re
from pathlib import Path

from tests import tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_pipeline_example_runs_as_written(capsys):
    block, _ = _python_blocks()
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "(8, 64, 64, 3) (8, 64, 64, 3)"


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    _, block = _python_blocks()
    folder = tmp_path / "stable-diffusion-v1-5" / "stable-diffusion-v1-5" / "unet"
    tiny.save_unet(folder, **dict(tiny.SD1_UNET, cross_attention_dim=768))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "(1, 64, 64, 4)"


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in README.read_text() and "torch==2.13.0" in ci
    assert 'pip install -e ".[test]"' in README.read_text() and '-e ".[test]"' in ci
    assert "python -m pytest -q" in README.read_text() and "python -m pytest -q" in ci
