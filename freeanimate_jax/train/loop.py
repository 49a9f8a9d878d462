"""The training run: models, data and state assembled from a runbook, the step loop, resume.

Everything a step does is a function of (seed, step): the batch (`data.batch(step)`), the
noise, timesteps and caption dropout (`fold_in(key(seed), step)`). A run restarted from the
checkpoint of step k therefore continues exactly as the uninterrupted run did: the same data
indices, the same losses, the same parameters, bit for bit.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax import parallel
from freeanimate_jax.config import TrainJob
from freeanimate_jax.data.errors import DataError
from freeanimate_jax.train import checkpoint, metrics, program
from freeanimate_jax.train import state as st


class TrainError(RuntimeError):
    """A run that cannot go on (a non-finite loss); one line naming the step."""


@dataclasses.dataclass
class Models:
    """The frozen base with the module to train inserted, and the frozen encoders."""

    unet: nnx.Module  # a UNetMotionModel, or a UNet2D (train.motion=none)
    adapter: nnx.Module | None  # its motion adapter (shares the UNet's motion modules)
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: Any
    adapter_config: dict | None
    controlnet: nnx.Module | None = None  # a ControlNet to train (with the UNet frozen)
    objective: str = "diffusion"  # vae: the VAE is what trains (`train.objective`)

    @property
    def trained_model(self) -> nnx.Module:
        """The module the trainable pattern is matched in: the UNet, or with a ControlNet both
        (paths `unet.` and `controlnet.`), or the VAE for the VAE objective."""
        if self.objective == "vae":
            return self.vae
        if self.controlnet is None:
            return self.unet
        return st.ControlledUNet(self.unet, self.controlnet)


def load_base(job: TrainJob, dtype: Any) -> Any:
    """The frozen SD family of the job (LoRAs and domain adapter merged), without its motion
    module: what training and the latent cache start from."""
    from freeanimate_jax.weights.assemble import load_models

    controlnet = "" if job.controlnet == st.NEW else job.controlnet
    return load_models(dataclasses.replace(job, motion_module="", controlnet=controlnet), dtype)


def build_models(job: TrainJob, dtype: Any, *, abstract: bool = False) -> Models:
    """The job's base (weights/assemble, as the sampling commands) and its motion module: the
    given one, or a new zero-initialised one of layout `train.motion` (none: no module); and
    the ControlNet `controlnet` names (`new`: made from the UNet, as diffusers' `from_unet`).
    The trained parameters are fp32 whatever the compute dtype (they are cast in the step).
    `abstract`: shapes only, nothing read or initialised (`fit train`): the base is SD1.5's
    architecture (or the tiny family for a tiny job) and the module a new one."""
    from freeanimate_jax.models.motion import UNetMotionModel

    base = _abstract_base(job, dtype) if abstract else load_base(job, dtype)
    loop = job.sections()[3]
    shapes = nnx.eval_shape if abstract else (lambda make: make())
    controlnet = None
    if job.controlnet:  # the config check allows it with train.motion=none only
        controlnet = (shapes(lambda: st.new_controlnet(base.unet, seed=loop.seed,
                                                         downscale=base.vae.downscale))
                      if job.controlnet == st.NEW or abstract else base.controlnet)
    if loop.objective == "vae":
        return Models(base.unet, None, base.vae, base.text_encoder, base.tokenizer, None,
                      objective="vae")
    if loop.motion == "none" and not job.motion_module:
        st.set_remat(base.unet, loop)
        return Models(base.unet, None, base.vae, base.text_encoder, base.tokenizer, None,
                      controlnet)
    if job.motion_module and not abstract:
        from freeanimate_jax.weights.assemble import _load_motion

        adapter = _load_motion(job, jnp.float32)
        config = dict(adapter.config) if hasattr(adapter, "config") else adapter.cfg.to_diffusers()
    else:
        config = st.new_adapter_config(base.unet.config, loop.motion)
        adapter = shapes(lambda: st.new_adapter(base.unet.config, loop.motion,
                                                norm_per_frame=loop.norm_per_frame,
                                                seed=loop.seed))
    unet = UNetMotionModel.from_unet2d(base.unet, adapter)
    st.set_remat(unet, loop)
    return Models(unet, adapter, base.vae, base.text_encoder, base.tokenizer, config)


def _abstract_base(job: TrainJob, dtype: Any) -> Any:
    from freeanimate_jax.config import TINY_MODEL
    from freeanimate_jax.fit.animate import abstract_models

    return abstract_models(job.model == TINY_MODEL, dtype)


def _chip_bytes() -> int | None:
    """A chip's memory as the runtime reports it (None where it does not: the CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


class Trainer:
    """One run: `Trainer(job, models, data, mesh).run()`."""

    def __init__(self, job: TrainJob, models: Models, data: Any, mesh: jax.sharding.Mesh,
                 *, compute_dtype: Any = jnp.float32, log=print):
        self.job, self.models, self.data, self.mesh, self.log = job, models, data, mesh, log
        self.data_cfg, self.noise, self.optim, self.loop, self.val = job.sections()
        self.out = metrics.run_folder(self.loop.output_dir)
        self.cached = self.data_cfg.source == "latents"
        self.controlled = models.controlnet is not None
        if self.controlled and (self.cached or "condition" not in data.batch(0)):
            raise DataError(f"controlnet training needs control images per frame; data.source="
                            f"{self.data_cfg.source} has none; expected rows with `condition` "
                            f"frames (the synthetic data has its shapes' masks)")
        p = program.build(job, models.trained_model, program.step_encoders(job, models), mesh,
                          compute_dtype=compute_dtype, chip_bytes=_chip_bytes())
        self.program, self.graphdef, self.encoder_graphs = p, p.graphdef, p.encoder_graphs
        self.tx, self.lr, self.cfg, self.sharded = p.tx, p.lr, p.cfg, p.sharded
        self.state_shardings, self.step_fn = p.state_shardings, p.step
        replicated = parallel.replicated(mesh)
        self.frozen = parallel.put(p.frozen, replicated)
        self.encoders = (None if p.encoder_states is None
                         else parallel.put(p.encoder_states, replicated))
        self.state = parallel.put(st.init_state(p.trained, self.tx, self.optim),
                                  self.state_shardings)
        self.ckpt = checkpoint.Checkpoints(self.out / "checkpoints", keep=self.loop.ckpt_keep,
                                           asynchronous=self.loop.ckpt_async)
        self.stop_requested = False
        self.data_motion: float | None = None
        self.val_condition: np.ndarray | None = None  # (F, H, W, 3) uint8, ControlNet runs
        self.empty_ids = self.token_ids([""])[0]

    # -- inputs ---------------------------------------------------------------------------
    def token_ids(self, captions) -> np.ndarray:
        from freeanimate_jax.models.clip_text import tokenize

        return np.asarray(tokenize(self.models.tokenizer, [str(c) for c in captions]))

    def device_batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The host's part of the global batch -> global arrays split over `data`."""
        if self.cached:
            local = {k: host[k] for k in ("mean", "logstd", "context")}
            empty = parallel.put(host["empty"], parallel.replicated(self.mesh))
        else:
            local = {"pixels": host["pixels"], "input_ids": self.token_ids(host["caption"])}
            if self.controlled:
                local["condition"] = host["condition"]
        out = {k: jax.make_array_from_process_local_data(
            program.data_sharding(self.mesh, v.ndim), v)
               for k, v in local.items()}
        if self.cached:
            out["empty"] = empty
        else:
            out["empty_ids"] = parallel.put(self.empty_ids, parallel.replicated(self.mesh))
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def record(self, step: int) -> dict[str, Any]:
        from freeanimate_jax.cli.run import _versions

        return {"step": step, "data": {"next_step": step, "seed": self.loop.seed,
                                       "global_batch": int(self.data.global_batch)},
                "trainable": self.loop.trainable, "adapter_config": self.models.adapter_config,
                "norm_per_frame": (None if self.models.adapter is None
                                   else bool(self.models.adapter.cfg.norm_per_frame)),
                "unet_config": (dict(self.models.unet.config) if self.models.adapter is None
                                else None),  # the image UNet an image-stage run trains
                "objective": self.models.objective,
                "vae_config": (dict(self.models.vae.config) if self.models.objective == "vae"
                               else None),
                "controlnet_config": (None if self.models.controlnet is None
                                      else dict(self.models.controlnet.config)),
                "base": {"model": self.job.model, "motion_module": self.job.motion_module,
                         "controlnet": self.job.controlnet},
                "config": self.job.to_dict(), "versions": _versions()}

    def restore(self, resume_from: int | None = None) -> int:
        """Continue from `resume_from`, else the latest complete checkpoint; the step."""
        step = resume_from if resume_from is not None else self.ckpt.latest()
        if step is None:
            return 0
        self.state, _ = self.ckpt.restore(step, self.state)
        if jax.process_index() == 0:
            metrics.truncate_jsonl(self.out / "metrics.jsonl", step)
        self.log(f"resumed from the checkpoint of step {step}")
        dropped = self.ckpt.drop_after(step)
        if dropped:
            self.log(f"deleted the later checkpoints (steps {dropped}): this run rewrites them")
        return step

    # -- the loop -------------------------------------------------------------------------
    def _on_sigterm(self, *_: Any) -> None:
        self.stop_requested = True

    def run(self, resume_from: int | None = None, validate=None) -> dict[str, Any]:
        start = self.restore(resume_from)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        writers = metrics.Writers(self.out, tensorboard=self.loop.tensorboard,
                                  wandb=self.loop.wandb, config=self.job.to_dict(),
                                  primary=jax.process_index() == 0)
        peak = metrics.peak_flops(jax.devices()[0].device_kind)
        flops = None  # per clip, from the compiled step (accelerators only)
        chips = self.mesh.size
        if validate is not None and self.val.every:
            self.data_motion = self._data_motion()
            if start == 0:
                validate(self, 0)  # the zero-initialised module's samples: the baseline
        losses: list[float] = []
        step, last_saved, t_prev, wait_total = start, start, time.perf_counter(), 0.0
        try:
            pending = None
            while step < self.loop.max_steps:
                t0 = time.perf_counter()
                host = pending if pending is not None else self.data.batch(step)
                batch = self.device_batch(host)
                wait = time.perf_counter() - t0  # the loop's data time not hidden by a step
                if flops is None and peak and jax.default_backend() != "cpu":
                    flops = self.flops_per_clip(batch)
                self.state, m = self.step_fn(self.state, batch, self.frozen, self.encoders)
                # The next batch is read on the host while the device runs this step (the loss
                # read below waits for it); batches are pure in the step, so this is exact.
                more = step + 1 < self.loop.max_steps
                pending = self.data.batch(step + 1) if more else None
                loss = float(m["loss"])
                if not np.isfinite(loss):
                    raise TrainError(
                        f"non-finite loss ({loss}) at step {step + 1}; stopped. The last good "
                        f"checkpoint is step {self.ckpt.latest() or 'none'}; expected a finite "
                        f"loss (try a lower optim.lr)")
                step += 1
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                wait_total += wait
                clips = self.data.global_batch / dt
                line = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                        "lr": float(m["lr"]), "s_per_step": dt, "clips_per_s": clips,
                        "data_wait": wait / dt, "indices": _global_rows(host["index"], self.mesh),
                        "t": np.asarray(m["t"]).tolist()}
                mfu = None
                if flops and peak and jax.default_backend() != "cpu":
                    line["tflops_per_chip"] = flops * clips / chips / 1e12
                    mfu = line["mfu"] = flops * clips / chips / peak
                writers.step(line)
                losses.append(loss)
                if step % self.loop.log_every == 0 or step == self.loop.max_steps:
                    writers.scalars(step, {k: v for k, v in line.items()
                                           if k not in ("indices", "t")})
                    self.log(metrics.progress_line(step, self.loop.max_steps, loss, dt, clips,
                                                   mfu))
                last = step == self.loop.max_steps
                if step % self.loop.ckpt_every == 0 or last or self.stop_requested:
                    self.ckpt.save(self.state, self.record(step))
                    last_saved = step
                if validate is not None and self.val.every and (
                        step % self.val.every == 0 or last):
                    validate(self, step)
                if self.stop_requested:
                    self.log(f"SIGTERM: saved step {step}; exiting (resume with the same "
                             f"command)")
                    break
        finally:
            self.ckpt.close()
            writers.close()
            signal.signal(signal.SIGTERM, previous)
        return {"start": start, "step": step, "last_saved": last_saved, "losses": losses,
                "stopped": self.stop_requested}

    def flops_per_clip(self, batch: dict[str, jax.Array]) -> float:
        """FLOPs of one step per clip, as XLA counts the compiled step (forward + backward)."""
        compiled = self.step_fn.lower(self.state, batch, self.frozen, self.encoders).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0)) / self.data.global_batch

    def _data_motion(self) -> float | None:
        """The training clips' motion score (mean absolute frame difference in [0, 1])."""
        from freeanimate_jax.train.validate import motion_score

        host = self.data.batch(0)
        if "condition" in host:
            self.val_condition = np.round(host["condition"][0] * 255).astype(np.uint8)
        if "pixels" not in host:
            return None
        return float(np.mean([motion_score((clip + 1) / 2) for clip in host["pixels"]]))

    def trained_params(self, ema: bool = False) -> nnx.State:
        return self.state["ema" if ema else "params"]

    def merged(self, ema: bool = False) -> nnx.Module:
        """The trained model (the UNet, or `ControlledUNet`) with the current trained
        parameters (fp32) and the frozen rest, as host copies: sampling runs on one process's
        first device whatever the mesh. Every process must call it (a multi-host run gathers
        the sharded state)."""
        params, frozen = jax.tree.map(parallel.to_host, (self.trained_params(ema), self.frozen))
        return nnx.merge(self.graphdef, params, frozen)


def _global_rows(local: np.ndarray, mesh: jax.sharding.Mesh) -> list[int]:
    """The rows of the whole global batch, hosts in order (each host read its slice), gathered
    over the mesh's devices (the communicator every step uses)."""
    if jax.process_count() == 1:
        return np.asarray(local).tolist()
    rows = jax.make_array_from_process_local_data(program.data_sharding(mesh, 1),
                                                  np.asarray(local, np.int32))
    return parallel.to_host(rows).tolist()
