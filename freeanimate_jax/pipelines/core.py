"""The sampling core: the one place where pipelines run their models.

Every pipeline (FreeAnimate, AnimateDiff generate) and `fit` go through what is here:

- **Stages.** A stage is a module-level function compiled with `jax.jit`, whose first argument
  is a frozen, hashable *program*: the graph definitions of the models, the runtime policy
  (attention kernel, device layout), the scheduler and every setting that fixes shapes or code.
  Weights and every call-time setting are traced arguments. jit's own cache, keyed on the
  program, is therefore the stage cache: a second call that changes only call-time settings
  compiles nothing, and two pipeline objects over models of the same architecture share their
  compiled stages. `Stage.__call__` (the run) and `Stage.lower` (fit) enter the same mesh
  context, `parallel.use(mesh)`: what fit compiles is what the run compiles.
- **Plans.** A pipeline describes its run as a list of `Step`s over named buffers (weights,
  inputs, earlier results, each with its frame axis or replicated). The run executes the plan
  on real buffers; fit lowers the same plan on abstract ones.
- **Shared pieces**: model placement on the mesh, the noise prediction of frames (ControlNet
  residuals with their per-step scale, motion-module video packing), classifier-free
  guidance, the DDIM update with eta noise, the per-step switches, text encoding and VAE
  stages, the progress display.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax import parallel
from freeanimate_jax.diffusion import ddim
from freeanimate_jax.models.attention import AttnControl, Runtime, plain
from freeanimate_jax.pipelines.common import (
    Progress,
    Pure,
    decode_latents,
    encode_latents,
    frame_noise,
    vae_to_images,
)
from freeanimate_jax.pipelines.settings import SamplingSettings

Array = jax.Array
FRAMES_4D = ("frames", None, None, None)
MODEL_NAMES = ("unet", "controlnet", "vae", "text_encoder")
TOKENS = 77  # CLIP's padded prompt length: the text encoder's compiled shape


# -- stages and plans -------------------------------------------------------------------------
def compiled(impl: Callable) -> Callable:
    """A stage function: jitted, its first argument (the program) static."""
    return jax.jit(impl, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One compiled stage bound to its program and mesh. `steps` > 0: a scan whose steps the
    progress display counts. `eager`: the run executes the function op by op (each op compiled
    on its own, under the same mesh and runtime policy) and fit compiles it whole; for the
    prompt encoding and the reference's VAE encode, which earlier releases ran op by op: fusing
    them moves the embeddings by an ulp, which the sampling amplifies into a visible change,
    so videos made with the same settings reproduce bit for bit."""

    name: str
    fn: Callable
    program: Any
    mesh: Any = None
    steps: int = 0
    eager: bool = False

    def __call__(self, *args: Any) -> Any:
        fn = self.fn.__wrapped__ if self.eager else self.fn
        with parallel.use(self.mesh):
            return fn(self.program, *args)

    def lower(self, *args: Any) -> Any:
        """Lower with (abstract) arguments exactly as `__call__` runs it."""
        with parallel.use(self.mesh):
            return self.fn.lower(self.program, *args)


@dataclasses.dataclass(frozen=True)
class Step:
    """A stage in a plan: the named buffers it takes, the named results it gives (each with
    its frame axis, or None for replicated)."""

    stage: Stage
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, int | None], ...]

    @property
    def name(self) -> str:
        return self.stage.name


class _Display:
    """Where step callbacks of the running stage go (the compiled programs are shared by every
    pipeline object, so the target is looked up when a step reports, not baked in)."""

    progress: Progress | None = None
    step_end: Callable[[str, int, Any, np.ndarray], None] | None = None


_DISPLAY = _Display()


def report_step(name: str, step: Array) -> None:
    """Call inside a scan body of a program compiled with progress on: one host callback per
    step (with `report_step_end`, the only things that leave the device during a scan)."""
    jax.debug.callback(partial(_show_step, name), step)


def _show_step(name: str, step: Any) -> None:
    if _DISPLAY.progress is not None:
        _DISPLAY.progress(name, step)


def report_step_end(name: str, step: Array, t: Array, latents: Array) -> None:
    """Call inside a scan body of a program compiled with a step-end callback: the step's
    index, timestep and whole new latents go to the host, in step order (diffusers'
    `callback_on_step_end`, read-only: the scan's carry stays on the device). An ordered
    io_callback, not jax.debug's: its ordering holds on a mesh of several devices."""
    from jax.experimental import io_callback

    io_callback(partial(_on_step_end, name), None, step, t, latents, ordered=True)


def _on_step_end(name: str, step: Any, t: Any, latents: Any) -> None:
    if _DISPLAY.step_end is not None:
        _DISPLAY.step_end(name, int(step), np.asarray(t).item(), np.asarray(latents))


def execute(plan: Sequence[Step], buffers: dict[str, Any], progress: Progress | None,
            timings: dict[str, float], step_end: Callable | None = None) -> dict[str, Any]:
    """Run `plan` on `buffers` (updated in place with every result); each stage's wall time,
    compilation included, goes to `timings` under its name. `step_end(stage, step, t, latents)`
    receives the steps of stages compiled to report them."""
    if progress is not None:
        for step in plan:
            if step.stage.steps:
                progress.stage(step.name, step.stage.steps)
    _DISPLAY.progress, _DISPLAY.step_end = progress, step_end
    try:
        for step in plan:
            clock = time.perf_counter()
            out = step.stage(*(buffers[k] for k in step.inputs))
            out = jax.block_until_ready(out)
            timings[step.name] = time.perf_counter() - clock
            if step_end is not None:
                jax.effects_barrier()  # the outputs can be ready before the last callback ran
            results = out if len(step.outputs) > 1 else (out,)
            for (key, _), value in zip(step.outputs, results, strict=True):
                buffers[key] = value
    finally:
        _DISPLAY.progress = _DISPLAY.step_end = None
    return buffers


# -- programs shared by the pipelines ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextProgram:
    graphdef: Any
    clip_skip: int | None
    dtype: Any


@compiled
def encode_text(p: TextProgram, state, ids: Array) -> tuple[Array, Array]:
    """Token ids of (prompt, negative prompt) -> their embeddings, (1, 77, D) each."""
    ctx = nnx.merge(p.graphdef, state)(ids, clip_skip=p.clip_skip).astype(p.dtype)
    return ctx[:1], ctx[1:]


@dataclasses.dataclass(frozen=True)
class VaeProgram:
    graphdef: Any
    runtime: Runtime
    chunk: int | None = None


@compiled
def vae_encode(p: VaeProgram, state, images: Array) -> Array:
    """Images in [-1, 1] -> scaled latent means (the deterministic encoding inversion uses)."""
    return encode_latents(nnx.merge(p.graphdef, state), images, p.chunk, runtime=p.runtime)


@compiled
def vae_decode(p: VaeProgram, state, z: Array) -> Array:
    """Scaled latents -> frames in [0, 1], float32."""
    return vae_to_images(decode_latents(nnx.merge(p.graphdef, state), z, p.chunk,
                                        runtime=p.runtime))


# -- per-call values and per-step switches ----------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CallValues:
    """The call-time settings one stage traces: scalars, and per-step switches in the order the
    stage's scan visits its steps. Fields a stage does not use are None."""

    guidance: Any = None  # () float32
    eta: Any = None  # () float32
    seed: Any = None  # () uint32
    controlnet: Any = None  # (S,) float32: the ControlNet scale at each step (0 = off)
    ra_sa: Any = None  # (S,) bool
    iba: Any = None  # (S,) bool
    start: Any = None  # () float32: the reference's weight in the preview's starting latent


def controlnet_scales(steps: int, start: float, end: float, scale: float) -> np.ndarray:
    """Per denoising step, the conditioning scale diffusers applies: `scale` where
    `control_guidance_start/end` keep step i, i.e. unless i/S < start or (i+1)/S > end."""
    keep = [0.0 if (i / steps < start or (i + 1) / steps > end) else 1.0 for i in range(steps)]
    return (np.asarray(keep) * scale).astype(np.float32)


def until_flags(steps: int, until: float) -> np.ndarray:
    """Per denoising step: on for the first floor(until * S + 1/2) steps, with `until` taken as
    the decimal it prints as (so 0.3 x 5 = 1.5 rounds up to 2, whatever the binary round-off)."""
    on = math.floor(decimal.Decimal(repr(float(until))) * steps + decimal.Decimal("0.5"))
    return np.arange(steps) < on


def call_values(s: SamplingSettings, steps: int, *, reverse: bool = False,
                until: Mapping[str, float] | None = None) -> CallValues:
    """The traced values of one stage of `steps` steps (inversions visit them in reverse)."""
    order = slice(None, None, -1) if reverse else slice(None)
    flags = {k: until_flags(steps, v)[order] for k, v in (until or {}).items()}
    return CallValues(
        guidance=np.float32(s.guidance_scale), eta=np.float32(s.eta),
        seed=np.uint32(s.seed % 2 ** 32),  # the bits jax.random.key(seed) takes
        controlnet=controlnet_scales(steps, s.controlnet_start, s.controlnet_end,
                                     s.controlnet_scale)[order],
        ra_sa=flags.get("ra_sa"), iba=flags.get("iba"))


def abstract(tree) -> Any:
    """Shapes and dtypes of a pytree of values (for fit)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)




# -- the model evaluation every pipeline makes ------------------------------------------------
def predict(unet, controlnet, z: Array, t: Array, ctx: Array, control: Array | None,
            cn_scale: Array | float, ctrl: AttnControl | None, *, video: bool) -> Array:
    """Noise prediction for frames `z` (F, h, w, c): the ControlNet's residuals for `control`
    scaled by `cn_scale`, then the UNet with the attention control `ctrl` (None: plain). `video`:
    the frames are one video to the motion modules."""
    ctx_f = jnp.broadcast_to(ctx, (z.shape[0],) + ctx.shape[1:])
    down = mid = None
    if controlnet is not None and control is not None:
        down, mid = controlnet(z, t, ctx_f, control, conditioning_scale=cn_scale,
                               attn=plain(ctrl.runtime) if ctrl is not None else None)
    if video:
        return unet(z[None], t, ctx_f, down, mid, attn=ctrl)[0]
    return unet(z, t, ctx_f, down, mid, attn=ctrl)


def guide(eps_c: Array, eps_u: Array, scale: Array) -> Array:
    """Classifier-free guidance. The traced scale computes in the predictions' dtype, as a
    Python float would."""
    return eps_u + jnp.asarray(scale).astype(eps_u.dtype) * (eps_c - eps_u)


def denoise_step(tables: ddim.DDIMTables, eps: Array, t: Array, z: Array, i: Array, *,
                 eta_noise: bool, call: CallValues, stream: str, runtime: Runtime) -> Array:
    """One DDIM step; with `eta_noise`, per-frame noise of the named stream at step `i`
    (`fold_in(seed, stream, step, frame)`: the same on any number of devices)."""
    if not eta_noise:
        return ddim.ddim_step(tables, eps, t, z)
    noise = runtime.constrain(frame_noise(call.seed, z.shape[0], z.shape[1:], z.dtype, stream, i),
                              ("frames",) + (None,) * (z.ndim - 1))
    return ddim.ddim_step(tables, eps, t, z, eta=call.eta, noise=noise)


# -- the base of every sampling pipeline ------------------------------------------------------
class Sampler:
    """Models placed once on the mesh as (graphdef, state) handles, the runtime policy of the
    mesh, and the stages every pipeline shares."""

    def __init__(self, models, settings: SamplingSettings, *, mesh=None,
                 progress: Progress | None = None, runtime: Runtime | None = None):
        self.models, self.settings, self.mesh, self.progress = models, settings, mesh, progress
        parallel.replicate_models([getattr(models, k) for k in MODEL_NAMES], mesh)
        self.pure = {k: Pure.of(m) for k in MODEL_NAMES if (m := getattr(models, k)) is not None}
        self.dtype = jnp.dtype(jax.tree.leaves(self.pure["unet"].state)[0].dtype)
        self.runtime = runtime if runtime is not None else parallel.runtime(mesh)

    @property
    def display(self) -> bool:
        """Whether scans report steps (compiled into the programs)."""
        return self.progress is not None and self.progress.enabled

    def graph(self, name: str) -> Any:
        return self.pure[name].graphdef if name in self.pure else None

    def weights(self) -> dict[str, Any]:
        """The weight buffers of a plan, by model name (None for an absent model, and for the
        name "no model": a stage told to run without one)."""
        return {**{k: self.pure[k].state if k in self.pure else None for k in MODEL_NAMES},
                "no model": None}

    def stage(self, name: str, fn: Callable, program: Any, steps: int = 0, *,
              eager: bool = False) -> Stage:
        return Stage(name, fn, program, self.mesh, steps, eager)

    def placement(self, shape: Sequence[int], axis: int | None):
        """Where a buffer of the plan lives on the mesh: its frame axis `axis` sharded by the
        runtime's layout rules, or replicated (`axis` None). The run (`place`) and fit
        (`Fitter.run`) both place buffers by this."""
        layout = self.runtime.layout or parallel.MeshLayout(self.mesh)
        return layout.frame_axis(shape, axis)

    def place(self, value: Any, axis: int | None) -> Any:
        """A host value as a stage input, placed by `placement`."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, value)
        return jax.tree.map(lambda a: parallel.put(a, self.placement(np.shape(a), axis)), value)

    def text_step(self, s: SamplingSettings) -> Step:
        program = TextProgram(self.graph("text_encoder"), s.clip_skip, self.dtype)
        return Step(self.stage("text encoder", encode_text, program, eager=True),
                    ("text_encoder", "ids"), (("ctx_c", None), ("ctx_u", None)))

    def decode_step(self, s: SamplingSettings, latents: str, name: str = "VAE decode",
                    out: str = "frames") -> Step:
        program = VaeProgram(self.graph("vae"), self.runtime, s.vae_chunk)
        return Step(self.stage(name, vae_decode, program), ("vae", latents), ((out, 0),))

    def token_ids(self, prompt: str, negative_prompt: str) -> np.ndarray:
        from freeanimate_jax.models.clip_text import tokenize

        return np.asarray(tokenize(self.models.tokenizer, [prompt, negative_prompt]))

    def to_host(self, x: Array, n: int | None = None) -> np.ndarray:
        out = parallel.to_host(x)
        return out if n is None else out[:n]
