"""Test set-up shared by every module: the CPU platform with 8 virtual devices, libtpu's
ahead-of-time client, and the tiny model family as session fixtures (built once)."""

import dataclasses
import os

import pytest

# Tests run on the CPU in fp32; 8 virtual devices let sharding tests build real meshes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu (for ahead-of-time TPU compiles) otherwise probes for TPU hosts on import.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: a module's programs are not used by
    the next, and kept they add up to many GiB over the suite."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def _tiny_family():
    from freeanimate_jax.demo import tiny_models

    return tiny_models(seed=0)


@pytest.fixture(scope="session")
def _tiny_motion_unet(_tiny_family):
    from freeanimate_jax.demo import tiny_motion_adapter
    from freeanimate_jax.models.motion import UNetMotionModel

    return UNetMotionModel.from_unet2d(_tiny_family.unet, tiny_motion_adapter())


@pytest.fixture(scope="session")
def tiny(_tiny_family):
    """`tiny()`: the tiny SD family + ControlNet (seed 0), in a fresh container a test may
    change (the models themselves are shared: do not change their weights)."""
    return lambda: dataclasses.replace(_tiny_family)


@pytest.fixture(scope="session")
def tiny_video(_tiny_family, _tiny_motion_unet):
    """`tiny_video(controlnet=False)`: the tiny family with the tiny motion module inserted."""
    def make(controlnet: bool = False):
        return dataclasses.replace(_tiny_family, unet=_tiny_motion_unet,
                                   controlnet=_tiny_family.controlnet if controlnet else None)

    return make


@pytest.fixture(scope="session")
def fresh_tiny():
    """`fresh_tiny(video=False)`: a newly built tiny family (the same weights as `tiny()`), for
    tests whose pipelines place the weights on a mesh in place: the shared ones stay on one
    device."""
    def make(video: bool = False):
        from freeanimate_jax.demo import tiny_models, tiny_motion_adapter
        from freeanimate_jax.models.motion import UNetMotionModel

        models = tiny_models(seed=0)
        if video:
            models.unet = UNetMotionModel.from_unet2d(models.unet, tiny_motion_adapter())
        return models

    return make


# The slowest modules first (minutes each, measured on the 2-core host): with two xdist
# workers taking one module at a time, a long module started last would run alone at the end.
SLOW_FIRST = ("test_readme_commands", "test_train_mesh", "test_tpu_lowering", "test_distributed",
              "test_notebooks", "test_train_resume", "test_pipeline_objects", "test_train",
              "test_fit", "test_fit_train", "test_cli", "test_animate", "test_generate",
              "test_train_controlnet", "test_cli_generate", "test_train_parity", "test_readme")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2],
                                         len(SLOW_FIRST)))
