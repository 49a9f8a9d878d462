"""The train step as the run compiles it, built once from the job, the models and the mesh.

The trainer runs it on real buffers; `freeanimate fit train` lowers the same `TrainStep` on
abstract ones (`abstract_args`) shaped and placed as the trainer places its buffers. Both build
it here, so what fit compiles is what the run compiles: the same trained/frozen split, the
same optimizer, state shardings and runtime policy (the attention kernel of the mesh's
platform, the data-parallel layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from freeanimate_jax import parallel
from freeanimate_jax.config import TrainJob
from freeanimate_jax.train import objective
from freeanimate_jax.train import state as st
from freeanimate_jax.train import step as sp
from freeanimate_jax.train.settings import OptimConfig

TOKENS = 77  # CLIP's padded prompt length


def data_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """A batch array split over `data` on its leading (clip) axis."""
    return NamedSharding(mesh, P(parallel.DATA, *([None] * (ndim - 1))))


@dataclasses.dataclass
class StepProgram:
    """What `build` made: the split, the optimizer, the state layout and the jitted step."""

    graphdef: Any
    trained: nnx.State  # the trained leaves as the model holds them (values or shapes)
    frozen: nnx.State  # everything else, in the compute dtype
    encoder_graphs: tuple | None  # (VAE, text encoder) graphdefs when they run in the step
    encoder_states: tuple | None
    tx: Any
    lr: Any
    cfg: sp.StepConfig
    sharded: bool  # trained state sharded over `data` (else replicated)
    state_shardings: Any
    step: sp.TrainStep
    mesh: jax.sharding.Mesh
    optim: OptimConfig  # the optimizer section (with an EMA the state holds one more copy)

    def abstract_args(self, global_batch: int, frames: int, size_hw: tuple[int, int], *,
                      cache_dtype: Any = jnp.bfloat16, latent_channels: int = 4,
                      latent_factor: int = 8, context_dim: int = 768,
                      condition: bool = False) -> tuple:
        """(state, batch, frozen, encoders) as shapes with the shardings the trainer gives
        them: the state by `state_shardings`, the batch split over `data` (the latent cache's
        posterior and embeddings, or pixels and token ids), weights replicated."""
        rep = parallel.replicated(self.mesh)

        def spec(tree, sharding):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=sharding), tree)

        state = jax.eval_shape(lambda t: st.init_state(t, self.tx, self.optim), self.trained)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             state, self.state_shardings)
        h, w = size_hw
        b, f = global_batch, frames
        if self.cfg.objective == "vae":  # frames as images, nothing else
            pixels = ((b, f, h, w, 3), jnp.float32)
            return state, {"pixels": jax.ShapeDtypeStruct(
                pixels[0], pixels[1], sharding=data_sharding(self.mesh, 5))}, \
                spec(self.frozen, rep), None
        if self.encoder_graphs is None:
            lat = (b, f, h // latent_factor, w // latent_factor, latent_channels)
            shapes = {"mean": (lat, cache_dtype), "logstd": (lat, cache_dtype),
                      "context": ((b, TOKENS, context_dim), cache_dtype)}
        else:
            shapes = {"pixels": ((b, f, h, w, 3), jnp.float32),
                      "input_ids": ((b, TOKENS), jnp.int32)}
            if condition:
                shapes["condition"] = ((b, f, h, w, 3), jnp.float32)
        batch = {k: jax.ShapeDtypeStruct(s, d, sharding=data_sharding(self.mesh, len(s)))
                 for k, (s, d) in shapes.items()}
        if self.encoder_graphs is None:
            batch["empty"] = jax.ShapeDtypeStruct((TOKENS, context_dim), cache_dtype,
                                                  sharding=rep)
        else:
            batch["empty_ids"] = jax.ShapeDtypeStruct((TOKENS,), jnp.int32, sharding=rep)
        encoders = None if self.encoder_states is None else spec(self.encoder_states, rep)
        return state, batch, spec(self.frozen, rep), encoders


def step_encoders(job: TrainJob, models: Any) -> tuple | None:
    """The frozen (VAE, text encoder) the step runs on pixels; None for the latent cache (the
    cache holds their outputs) and for the VAE objective (the VAE is what trains)."""
    if job.data.source == "latents" or job.train.objective == "vae":
        return None
    return models.vae, models.text_encoder


def build(job: TrainJob, model: nnx.Module, encoders: tuple | None, mesh: jax.sharding.Mesh,
          *, compute_dtype: Any, chip_bytes: int | None) -> StepProgram:
    """The step of `job` training `model` (the UNet, or `ControlledUNet`) on `mesh`.
    `encoders`: the frozen (VAE, text encoder) when pixels feed the step, None for the latent
    cache. `chip_bytes`: a chip's memory, for `train.state_sharding=auto` (None: unknown)."""
    data, noise, optim, loop, _ = job.sections()
    graphdef, trained, frozen = st.split(model, loop.trainable)
    frozen = jax.tree.map(lambda x: _cast(x, compute_dtype), frozen)
    encoder_graphs = encoder_states = None
    if encoders is not None:
        (vg, vs), (tg, ts) = (nnx.split(m) for m in encoders)
        encoder_graphs, encoder_states = (vg, tg), (vs, ts)
    tx = st.optimizer(optim, loop.max_steps)
    lr = st.learning_rate(optim, loop.max_steps)
    vae = encoders[0] if encoders is not None else None
    cfg = sp.StepConfig(
        noise=noise, caption_dropout=data.caption_dropout, grad_accum=optim.grad_accum,
        seed=loop.seed, scaling_factor=float(getattr(vae, "scaling_factor", 0.18215)),
        compute_dtype=compute_dtype, ema_decay=optim.ema_decay, objective=loop.objective,
        kl_weight=loop.kl_weight,
        runtime=parallel.runtime(mesh, rules=parallel.DATA_RULES))
    n_trained = sum(x.size for x in jax.tree.leaves(trained))
    sharded = st.shard_state(loop, optim, n_trained, mesh.shape[parallel.DATA], chip_bytes)
    state = jax.eval_shape(lambda t: st.init_state(t, tx, optim), trained)
    rules = ((".*", "fsdp"),) if sharded else parallel.REPLICATED_PARAMS
    shardings = parallel.param_shardings(state, mesh, rules)
    step = sp.make_step(graphdef, tx, lr, objective.alphas(noise), cfg, encoder_graphs,
                        shardings)
    return StepProgram(graphdef, trained, frozen, encoder_graphs, encoder_states, tx, lr, cfg,
                       sharded, shardings, step, mesh, optim)


def _cast(x: Any, dtype: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype)
    return jnp.asarray(x, dtype)
