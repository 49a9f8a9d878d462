"""The train step: one jitted function of (state, batch) with the state donated.

Inputs come in one of two forms: pixels and token ids (the VAE and the text encoder run in the
step, frozen), or the latent cache's posterior (mean, log-std per frame) and text embeddings
(neither model is in the step). Either way the step draws, from `fold_in(key(seed), step)`:
the posterior sample, the timesteps, the noise and the caption dropout, for the whole global
batch at once, so the draws do not depend on how the batch is split over devices or into
accumulation micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from einops import rearrange
from flax import nnx

from freeanimate_jax import parallel
from freeanimate_jax.diffusion import ddim
from freeanimate_jax.models.attention import DEFAULT_RUNTIME, Runtime, plain
from freeanimate_jax.pipelines.core import predict
from freeanimate_jax.train import objective
from freeanimate_jax.train.settings import NoiseConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What fixes the step's program (static under jit)."""

    noise: NoiseConfig
    caption_dropout: float
    grad_accum: int
    seed: int
    scaling_factor: float = 0.18215
    compute_dtype: Any = jnp.float32
    ema_decay: float | None = None
    objective: str = "diffusion"  # or "vae": the trained model is the VAE (`vae_loss_fn`)
    kl_weight: float = 1e-6
    # The attention kernel and the data-parallel layout of the mesh (`parallel.runtime`): on a
    # TPU the flash kernel runs per shard, which only the layout can tell it.
    runtime: Runtime = DEFAULT_RUNTIME


def draws(cfg: StepConfig, step: Array, batch: int) -> dict[str, Array]:
    """The step's random keys and per-example draws (a pure function of seed and step)."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    k_t, k_noise, k_drop, k_sample = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (batch,), 0, cfg.noise.num_train_timesteps)
    drop = jax.random.uniform(k_drop, (batch,)) < cfg.caption_dropout
    return {"t": t, "drop": drop, "k_noise": k_noise, "k_sample": k_sample}


def posterior(batch: dict[str, Array], encoders: Any, runtime: Runtime = DEFAULT_RUNTIME
              ) -> tuple[Array, Array, Array, Array]:
    """(mean, logstd, context, empty context) from a cached batch, or by running the frozen
    VAE (per frame) and text encoder on pixels and token ids."""
    if "mean" in batch:
        return batch["mean"], batch["logstd"], batch["context"], batch["empty"]
    vae, text_encoder = encoders
    b = batch["pixels"].shape[0]
    mean, logvar = vae.encode(rearrange(batch["pixels"], "b f h w c -> (b f) h w c"),
                              runtime=None if runtime == DEFAULT_RUNTIME else runtime)
    mean, logvar = (rearrange(x, "(b f) h w c -> b f h w c", b=b) for x in (mean, logvar))
    context = text_encoder(batch["input_ids"])
    empty = text_encoder(batch["empty_ids"][None])[0]
    return mean, 0.5 * logvar, context, empty


def model_inputs(cfg: StepConfig, d: dict[str, Array], mean: Array, logstd: Array,
                 context: Array, empty: Array) -> dict[str, Array]:
    """Clean latents (a posterior sample x scaling factor), noise, timesteps, the text (""
    where dropped): the inputs of the loss, which the parity tests give it directly."""
    mean, logstd = mean.astype(jnp.float32), logstd.astype(jnp.float32)
    eps = jax.random.normal(d["k_sample"], mean.shape, jnp.float32)
    z0 = (mean + jnp.exp(logstd) * eps) * cfg.scaling_factor
    noise = objective.video_noise(d["k_noise"], z0.shape, cfg.noise.offset)
    context = jnp.where(d["drop"][:, None, None], empty[None].astype(context.dtype), context)
    return {"z0": z0, "noise": noise, "t": d["t"], "context": context}


def vae_inputs(cfg: StepConfig, step: Array, pixels: Array, graphdef: Any, params: nnx.State,
               frozen: nnx.State) -> tuple[dict[str, Array], dict[str, Array]]:
    """The VAE objective's inputs: the frames and the posterior-sample noise for the whole
    global batch (B, F, h, w, latent channels), drawn from the step's key like the diffusion
    draws, so neither the device split nor micro-batching changes them."""
    d = draws(cfg, step, pixels.shape[0])
    vae = nnx.merge(graphdef, params, frozen)  # read at trace time for the latent shape only
    b, f, h, w, _ = pixels.shape
    shape = (b, f, h // vae.downscale, w // vae.downscale, vae.latent_channels)
    return {"pixels": pixels, "eps": jax.random.normal(d["k_sample"], shape, jnp.float32)}, d


def denoise(model: Any, zt: Array, t: Array, context: Array, cond: Array | None,
            runtime: Runtime = DEFAULT_RUNTIME) -> Array:
    """The prediction for noised clips `zt` (B, F, h, w, c), timesteps and text per clip. A
    UNetMotionModel sees each clip as one video, a UNet2D each frame as an image; with a
    ControlNet (`model.controlnet`, conditions `cond` (B, F, H, W, 3) in [0, 1]) the frames go
    as images through the sampling core's ControlNet wiring. `runtime`: the kernel and layout
    every attention layer uses."""
    ctrl = plain(runtime)
    if cond is None:
        return model(zt, t, context, attn=ctrl)
    f = zt.shape[1]
    fold = lambda x: rearrange(x, "b f ... -> (b f) ...")  # noqa: E731
    eps = predict(model.unet, model.controlnet, fold(zt), jnp.repeat(t, f),
                  jnp.repeat(context, f, axis=0), fold(cond), 1.0, ctrl, video=False)
    return rearrange(eps, "(b f) ... -> b f ...", f=f)


def loss_fn(params: nnx.State, frozen: nnx.State, graphdef: Any, inputs: dict[str, Array],
            alphas: Array, cfg: StepConfig) -> Array:
    """fp32 MSE of the UNet's prediction on noised latents against the objective's target;
    the trained params are cast to the compute dtype (they stay fp32 in the state)."""
    cast = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)
    # Fresh Variables: the frozen ones were made outside this trace, and remat writes back.
    unet = nnx.merge(graphdef, cast, frozen, copy=True)
    z0, noise, t = inputs["z0"], inputs["noise"], inputs["t"]
    zt = ddim.add_noise(alphas, z0, noise, t)
    pred = denoise(unet, zt.astype(cfg.compute_dtype), t,
                   inputs["context"].astype(cfg.compute_dtype), inputs.get("cond"), cfg.runtime)
    tgt = objective.target(alphas, z0, noise, t, cfg.noise.prediction_type)
    weights = objective.loss_weights(alphas, t, cfg.noise.snr_gamma, cfg.noise.prediction_type)
    return objective.mse(pred, tgt, weights)


def vae_loss_fn(params: nnx.State, frozen: nnx.State, graphdef: Any,
                inputs: dict[str, Array], alphas: Array, cfg: StepConfig) -> Array:
    """The VAE objective on frames as images: MSE of the reconstruction of a posterior sample
    (mean + std x eps) against the frame, plus `kl_weight` x the posterior's KL to N(0, I)
    summed per image (diffusers' `DiagonalGaussianDistribution.kl`), averaged over images.
    SD's own VAE adds LPIPS and a patch GAN; the toy world's flat colours need neither."""
    del alphas
    cast = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)
    vae = nnx.merge(graphdef, cast, frozen, copy=True)
    x = rearrange(inputs["pixels"], "b f h w c -> (b f) h w c")
    runtime = None if cfg.runtime == DEFAULT_RUNTIME else cfg.runtime
    mean, logvar = vae.encode(x.astype(cfg.compute_dtype), runtime=runtime)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    eps = rearrange(inputs["eps"], "b f h w c -> (b f) h w c")
    z = mean + jnp.exp(0.5 * logvar) * eps
    rec = vae.decode(z.astype(cfg.compute_dtype), runtime=runtime).astype(jnp.float32)
    mse = jnp.mean(jnp.square(rec - x.astype(jnp.float32)))
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    return mse + cfg.kl_weight * jnp.mean(kl)


def _grads(params, frozen, graphdef, inputs, alphas, cfg: StepConfig):
    """Loss and gradients, the batch in `grad_accum` micro-batches (equal sizes, so the mean
    of their means is the batch mean): only one micro-batch's activations live at a time."""
    value_and_grad = jax.value_and_grad(vae_loss_fn if cfg.objective == "vae" else loss_fn)
    k = cfg.grad_accum
    if k == 1:
        return value_and_grad(params, frozen, graphdef, inputs, alphas, cfg)
    micro = jax.tree.map(lambda x: rearrange(x, "(k b) ... -> k b ...", k=k), inputs)

    def body(carry, mb):
        loss, grads = value_and_grad(params, frozen, graphdef, mb, alphas, cfg)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zero, micro)
    return jax.tree.map(lambda x: x / k, (loss, grads))


def train_step(state: dict[str, Any], batch: dict[str, Array], frozen: nnx.State,
               encoders: Any, graphdef: Any, encoder_graphs: Any,
               tx: optax.GradientTransformation, lr: optax.Schedule, alphas: Array,
               cfg: StepConfig) -> tuple[dict[str, Any], dict[str, Array]]:
    """One optimizer step; returns the new state and the step's metrics. `encoders`: the
    states of the frozen (VAE, text encoder) for pixel batches, else None."""
    step = state["step"]
    if encoders is not None:
        encoders = tuple(nnx.merge(g, s) for g, s in zip(encoder_graphs, encoders, strict=True))
    if cfg.objective == "vae":
        inputs, d = vae_inputs(cfg, step, batch["pixels"], graphdef, state["params"], frozen)
    else:
        mean, logstd, context, empty = posterior(batch, encoders, cfg.runtime)
        d = draws(cfg, step, mean.shape[0])
        inputs = model_inputs(cfg, d, jax.lax.stop_gradient(mean),
                              jax.lax.stop_gradient(logstd), jax.lax.stop_gradient(context),
                              jax.lax.stop_gradient(empty))
    if "condition" in batch:  # ControlNet training: the frames' condition images
        inputs["cond"] = batch["condition"]
    loss, grads = _grads(state["params"], frozen, graphdef, inputs, alphas, cfg)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt": opt, "step": step + 1}
    if "ema" in state:
        decay = cfg.ema_decay
        new["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr(step),
               "t": d["t"]}
    return new, metrics


def make_step(graphdef: Any, tx: optax.GradientTransformation, lr: optax.Schedule,
              alphas: Array, cfg: StepConfig, encoder_graphs: Any = None,
              state_shardings: Any = None) -> TrainStep:
    """`step(state, batch, frozen, encoders) -> (state, metrics)`, jitted, state donated; with
    `state_shardings`, run (and lowered) on their mesh."""
    def fn(state, batch, frozen, encoders):
        return train_step(state, batch, frozen, encoders, graphdef, encoder_graphs, tx, lr,
                          alphas, cfg)

    out = mesh = None
    if state_shardings is not None:
        # The metrics replicated: every host reads them (per-clip `t` would span hosts).
        mesh = jax.tree.leaves(state_shardings)[0].mesh
        out = (state_shardings, parallel.replicated(mesh))
    return TrainStep(jax.jit(fn, donate_argnums=(0,), out_shardings=out), mesh)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted step bound to its mesh. The run calls it and `fit train` lowers it through the
    one mesh entry every pipeline stage uses (`parallel.use`): what fit compiles is what the
    run compiles."""

    jitted: Any
    mesh: Any = None

    def __call__(self, *args: Any) -> Any:
        with parallel.use(self.mesh):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with parallel.use(self.mesh):
            return self.jitted.lower(*args)
