"""The pipelines' stages lowered for a multi-chip TPU exactly as the run lowers them: the
pipeline's own plan, buffers shaped and placed by the pipeline's own `input_specs`, each stage
through `Stage.lower` (the run's entry, `parallel.use(mesh)` included); the test adds no mesh
or kernel context. The tiny family at 128x128 px, so the first UNet level attends over 256
tokens and the Pallas flash kernel takes those sequences (at 64x64 every sequence would go to
XLA and this would prove nothing)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from freeanimate_jax.fit.animate import abstract_models
from freeanimate_jax.fit.generate import abstract_video_models
from freeanimate_jax.pipelines.animate import AnimateSettings, FreeAnimate
from freeanimate_jax.pipelines.generate import Generate, GenerateSettings
from tests.helpers import lower_plan

pytest.importorskip("libtpu")
pytestmark = pytest.mark.slow

SIZE = (128, 128)
# Stages whose programs attend over 128-multiples: each must hold the Pallas kernel.
FLASH_STAGES = {"VAE encode", "reference inversion", "preview", "preview inversion", "denoise",
                "VAE decode"}


def _v5e4_mesh():
    from jax.experimental import topologies

    from freeanimate_jax import parallel

    return parallel.make_mesh(devices=topologies.get_topology_desc("v5e:2x2", "tpu").devices)


def test_animate_stages_compile_for_v5e_4_with_the_flash_kernel():
    mesh = _v5e4_mesh()
    s = AnimateSettings(steps=2, preview_steps=2)
    pipe = FreeAnimate(abstract_models(True, jnp.bfloat16), s, mesh=mesh)
    texts = lower_plan(pipe, pipe.plan(s), pipe.input_specs(4, SIZE, s), only=FLASH_STAGES)
    assert FLASH_STAGES <= set(texts)
    for name in FLASH_STAGES:
        assert "tpu_custom_call" in texts[name], f"{name}: no Pallas kernel in the program"


def test_generate_denoise_compiles_for_v5e_4_with_the_flash_kernel():
    mesh = _v5e4_mesh()
    s = GenerateSettings(frames=4, steps=2)
    pipe = Generate(abstract_video_models(True, "v3", True, jnp.bfloat16), s, mesh=mesh)
    texts = lower_plan(pipe, pipe.plan(s, True), pipe.input_specs(SIZE, s, True),
                       only={"denoise", "VAE decode"})
    assert "tpu_custom_call" in texts["denoise"] and "tpu_custom_call" in texts["VAE decode"]


def test_train_step_compiles_for_v5e_4_with_the_flash_kernel():
    """The trainer's own step (as `freeanimate train run` builds it, over the tiny family, the
    VAE encoding pixels in the step) on the data-parallel mesh of 4 v5e chips: the attention
    kernel comes from the mesh's platform and runs per shard. Built without the mesh's runtime,
    the step picked its kernel from the host's backend: XLA when compiled on a CPU host, the
    Pallas kernel unpartitioned on the TPU itself."""
    from jax.experimental import topologies

    from freeanimate_jax import config as cfg
    from freeanimate_jax import parallel
    from freeanimate_jax.fit.train import step_args, step_program

    job = cfg.load_job(None, ["data.source=frames", "data.frames=4", "size=128"],
                       base=cfg.DEMO_TRAIN_CONFIG, schema=cfg.TrainJob)
    mesh = parallel.data_mesh(topologies.get_topology_desc("v5e:2x2", "tpu").devices)
    program, models = step_program(job, "bfloat16", mesh, None)
    assert program.cfg.runtime.kernel == "tpu_flash"
    text = program.step.lower(*step_args(program, models, 4, 4, SIZE)).compile().as_text()
    assert "tpu_custom_call" in text, "no Pallas kernel in the train step"
