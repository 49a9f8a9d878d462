"""`hf://owner/repo/path/in/repo.ext`: one file of a hub repository, fetched by huggingface_hub
into its cache, wherever a weights file is expected. Tests seed a cache folder as
huggingface_hub lays it out (refs/main -> snapshots/<commit>/<path>) and keep the network off."""

from __future__ import annotations

import subprocess
import sys

import pytest

from freeanimate_jax.weights.errors import WeightsError
from tests.helpers import hub_snapshot


def _seed(hub, repo: str, filename: str, data: bytes) -> None:
    target = hub_snapshot(hub, repo) / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    # huggingface_hub reads these at import: point its module constants at the test's cache.
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return home / "hub"


def test_a_hub_file_comes_from_the_cache_and_a_missing_one_is_named(offline_hub):
    from freeanimate_jax.weights.loader import resolve_file

    _seed(offline_hub, "someone/motion", "sub/dir/adapter.safetensors", b"weights")
    path = resolve_file("hf://someone/motion/sub/dir/adapter.safetensors", "domain_adapter")
    assert path.read_bytes() == b"weights" and path.name == "adapter.safetensors"
    assert resolve_file("local/file.ckpt").as_posix() == "local/file.ckpt"
    with pytest.raises(WeightsError) as e:
        resolve_file("hf://guoyww/animatediff/v3_sd15_adapter.ckpt", "domain_adapter")
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith("domain_adapter: could not download v3_sd15_adapter.ckpt from the "
                           "hub repo guoyww/animatediff")
    assert "hf download guoyww/animatediff v3_sd15_adapter.ckpt" in text
    with pytest.raises(WeightsError, match="expected hf://owner/repo/path/in/repo.ext"):
        resolve_file("hf://only/repo", "lora")


def test_job_files_are_fetched_with_their_scales(offline_hub):
    from freeanimate_jax import config as cfg
    from freeanimate_jax.weights.assemble import fetch_hub_files

    _seed(offline_hub, "a/b", "x.safetensors", b"1")
    _seed(offline_hub, "a/b", "mm/v3.ckpt", b"2")
    job = cfg.load_job(None, ["lora=hf://a/b/x.safetensors:0.5", "domain_adapter=hf://a/b/x.safetensors",
                              "motion_module=hf://a/b/mm/v3.ckpt"], schema=cfg.GenerateJob)
    got = fetch_hub_files(job)
    path, scale = cfg.parse_weighted(got.lora[0])
    assert scale == 0.5 and open(path, "rb").read() == b"1"
    assert open(got.domain_adapter, "rb").read() == b"1"
    assert open(got.motion_module, "rb").read() == b"2"
    assert got.model == job.model  # a hub id (a folder) is not a hub file


def test_the_v3_runbook_offline_names_the_adapter_to_fetch(tmp_path):
    """The README's AnimateDiff v3 command on a machine with no network and an empty cache:
    one line naming the repo and the file, exit 2, nothing written."""
    env_code = (
        "import os, sys; os.environ['HF_HUB_OFFLINE'] = '1'; "
        f"os.environ['HF_HOME'] = {str(tmp_path / 'hf')!r}; "
        "from freeanimate_jax.cli import main; "
        "sys.exit(main(['generate', '--config', 'configs/animatediff_v3.yaml', '--prompt', "
        f"'a corgi', '--out', {str(tmp_path / 'out' / 'corgi.mp4')!r}]))")
    p = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True,
                       timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "domain_adapter: could not download v3_sd15_adapter.ckpt from the hub repo " \
           "guoyww/animatediff" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
