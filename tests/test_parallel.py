"""Sharding lives in `parallel`: logical-axis rules that raise when one is missing, parameter
rules by name pattern, and models that never look up a mesh."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from freeanimate_jax import parallel
from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate

MODELS = Path(__file__).parents[1] / "freeanimate_jax" / "models"
FORBIDDEN = ("freeanimate_jax.parallel", "freeanimate_jax.pipelines", "freeanimate_jax.weights",
             "freeanimate_jax.cli", "freeanimate_jax.fit")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_models_import_no_sharding_pipelines_weights_or_cli():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        bad = sorted(n for n in _imports(path) if n == "freeanimate_jax" or n.startswith(
            FORBIDDEN) or n.split(".")[-1] in ("parallel", "pipelines", "weights", "cli"))
        assert not bad, f"{path.name} imports {bad}"
        text = path.read_text()
        assert "get_abstract_mesh" not in text and "PartitionSpec" not in text, path.name


def test_a_logical_axis_without_a_rule_is_an_error():
    mesh = parallel.make_mesh()
    layout = parallel.MeshLayout(mesh, rules=(("frames", (parallel.DATA, parallel.FRAMES)),))
    with pytest.raises(ValueError, match="no sharding rule for the logical axis "
                                         "'temporal_tokens'"):
        layout.spec((16, 4, 8), ("temporal_tokens", None, None))
    # A rule that names a mesh axis the mesh lacks (inference rules on a data-only mesh).
    data_mesh = jax.sharding.Mesh(np.array(jax.devices()), (parallel.DATA,))
    with pytest.raises(ValueError, match=r"names mesh axes \['frames'\]"):
        parallel.MeshLayout(data_mesh).spec((8, 2), ("frames", None))
    assert parallel.MeshLayout(data_mesh, parallel.DATA_RULES).spec(
        (8, 2), ("frames", None)) == P(("data",), None)


def test_an_undivided_dimension_is_replicated_by_rule():
    layout = parallel.MeshLayout(parallel.make_mesh())
    assert layout.spec((16, 3), ("frames", None)) == P(("data", "frames"), None)
    assert layout.spec((1, 3), ("frames", None)) == P(None, None)  # the single reference


def test_the_product_raises_for_a_missing_rule(fresh_tiny):
    # FreeAnimate with motion modules on a mesh whose rules lack the temporal tokens' axis:
    # the layer's constraint is not silently skipped.
    mesh = parallel.make_mesh()
    runtime = parallel.runtime(mesh, rules=(("frames", (parallel.DATA, parallel.FRAMES)),))
    pipe = FreeAnimate(fresh_tiny(video=True), AnimateSettings(steps=1, preview_steps=1),
                       mesh=mesh, runtime=runtime)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (64, 64, 3), np.uint8)
    poses = rng.integers(0, 256, (8, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="no sharding rule for the logical axis "
                                         "'temporal_tokens'"):
        pipe(ref, poses, "a dancer")


def test_parameter_rules_by_name_pattern():
    mesh = parallel.make_mesh(frames=1, data=8)
    state = {"down_blocks": {"0": {"motion_modules": {"w": jnp.zeros((32, 64)),
                                                      "b": jnp.zeros((3,))}},
                             "1": {"conv": jnp.zeros((3, 3, 16, 24))}}}
    rep = parallel.param_shardings(state, mesh)
    assert all(s.spec == P() for s in jax.tree.leaves(rep))
    rules = ((r".*motion_modules.*", "fsdp"), (r".*", "replicate"))
    fsdp = parallel.param_shardings(state, mesh, rules)
    mm = fsdp["down_blocks"]["0"]["motion_modules"]
    assert mm["w"].spec == P(None, "data")  # the largest dimension the data axis divides
    assert mm["b"].spec == P()  # nothing divisible by 8: replicated
    assert fsdp["down_blocks"]["1"]["conv"].spec == P()
    placed = jax.device_put(state, fsdp)
    assert placed["down_blocks"]["0"]["motion_modules"]["w"].addressable_shards[0].data.shape \
        == (32, 8)
    with pytest.raises(ValueError, match="unknown strategy"):
        parallel.param_shardings(state, mesh, ((".*", "shard_everything"),))


def test_the_kernel_follows_the_mesh_platform():
    from jax.experimental import topologies

    tpu = parallel.make_mesh(devices=topologies.get_topology_desc("v5e:2x2", "tpu").devices)
    assert parallel.runtime(tpu).kernel == "tpu_flash"
    assert parallel.runtime(parallel.make_mesh()).kernel == "xla"  # CPU devices
    assert parallel.runtime(None).kernel == parallel.kernel_for(jax.default_backend())
    assert parallel.runtime(tpu, kernel="xla").kernel == "xla"
    # Part of the static policy: different kernels are different (hashed) programs.
    assert parallel.runtime(tpu) != parallel.runtime(tpu, kernel="xla")
    assert hash(parallel.runtime(tpu)) == hash(parallel.runtime(tpu))
