"""`freeanimate fit animate`: does FreeAnimate fit a TPU slice? Answered ahead of time.

The models are built abstractly (shapes only: no download, no init); the plan is the one
`FreeAnimate.__call__` runs, its buffers shaped and placed by the pipeline's own
`input_specs`, every stage lowered through the entry the run uses (see `core.Fitter`).
"""

from __future__ import annotations

import dataclasses
import fnmatch

from freeanimate_jax.fit.core import Fitter, GiB, chips_text, format_table, size_text

STAGES = ("text encoder", "VAE encode", "reference inversion", "preview reference inversion",
          "preview start", "preview", "preview inversion", "denoise", "VAE decode")


def abstract_models(tiny: bool, dtype):
    """SD 1.5 + openpose ControlNet (or the tiny family) with shapes only, in `dtype`."""
    from freeanimate_jax import demo
    from freeanimate_jax.diffusion.ddim import SchedulerConfig
    from freeanimate_jax.models import known_configs as kc
    from freeanimate_jax.weights.loader import build
    from freeanimate_jax.weights.pipeline import SDPipelineModels

    configs = demo.TINY_CONFIGS if tiny else {
        "unet": kc.SD15_UNET, "controlnet": kc.OPENPOSE_CONTROLNET, "vae": kc.SD15_VAE,
        "text_encoder": kc.SD15_TEXT_ENCODER}
    made = {k: build(c, param_dtype=dtype, abstract=True) for k, c in configs.items()}
    return SDPipelineModels(unet=made["unet"], vae=made["vae"],
                            text_encoder=made["text_encoder"], tokenizer=None,
                            scheduler=SchedulerConfig.from_dict(kc.SD15_SCHEDULER),
                            controlnet=made["controlnet"])


def iba_cache(models, settings, latent_hw: tuple[int, int], dtype) -> dict:
    """Bytes the IBA cache holds per frame per inversion step, per cache mode, from the
    layers' real token counts and widths (one abstract UNet forward)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from freeanimate_jax.models.attention import Attention, AttnControl
    from freeanimate_jax.pipelines.common import Pure

    unet, (h, w), item = Pure.of(models.unet), latent_hw, jnp.dtype(dtype).itemsize
    ctx_dim = models.unet.config["cross_attention_dim"]

    def hidden(state, z, t, ctx):
        ctrl = AttnControl(capture_hidden=settings.iba_layers)
        unet.bind(state)(z, t, ctx, attn=ctrl)
        return {p: c["hidden"] for p, c in ctrl.captured.items()}

    shapes = jax.eval_shape(hidden, unet.state, jax.ShapeDtypeStruct((1, h, w, 4), dtype),
                            jax.ShapeDtypeStruct((), jnp.int32),
                            jax.ShapeDtypeStruct((1, 77, ctx_dim), dtype))
    heads = {n.path: n.heads for _, n in nnx.iter_graph(models.unet)
             if isinstance(n, Attention)}
    layers = []
    for path, s in sorted(shapes.items()):
        length, chans = s.shape[1], s.shape[2]
        # An RA-SA layer attends over [own tokens ; reference tokens]: twice the keys.
        keys = 2 * length if any(fnmatch.fnmatchcase(path, p)
                                 for p in settings.ra_sa_layers) else length
        layers.append({"layer": path, "tokens": length, "channels": chans,
                       "heads": heads[path], "keys": keys})
    return {
        "layers": layers,
        "hidden": sum(x["tokens"] * x["channels"] * item for x in layers),
        "maps": sum(x["heads"] * x["tokens"] * x["keys"] * 4 for x in layers),  # fp32 softmax
        "recompute": h * w * models.unet.config["in_channels"] * item,  # the latent it saw
    }


def fit_animate(topology: str, frames: int, size_hw: tuple[int, int], settings, *,
                tiny: bool = False, dtype: str = "bfloat16", hbm_gib: float | None = None,
                only: set[str] | None = None, log=lambda msg: None) -> dict:
    """Lower every stage of the plan (later stages take earlier ones' output shapes) and
    compile those in `only` (default: all); returns the report `format_report` prints."""
    import jax.numpy as jnp

    from freeanimate_jax import parallel
    from freeanimate_jax.pipelines.animate import FreeAnimate

    fit = Fitter(topology, hbm_gib=hbm_gib, only=only, log=log)
    s, dtype = settings, jnp.dtype(dtype)
    models = abstract_models(tiny, dtype)
    fa = FreeAnimate(models, s, mesh=fit.mesh, progress=None)
    n_pad, down = parallel.padded_frames(frames, fit.mesh), models.vae.downscale
    fit.run(fa, fa.plan(s), fa.input_specs(frames, size_hw, s))
    per_step = iba_cache(models, s, (size_hw[0] // down, size_hw[1] // down), dtype)
    return fit.report(
        dtype=dtype.name, pipeline="animate", frames=frames, padded_frames=n_pad,
        size=list(size_hw), tiny=tiny, settings=dataclasses.asdict(s),
        cache={"mode": s.cache_mode, "layers": per_step["layers"],
               "bytes_per_frame_step": {m: per_step[m] for m in ("hidden", "maps",
                                                                 "recompute")},
               # frames are sharded: each chip holds its n_pad / chips frames' cache
               "bytes_per_chip": per_step[s.cache_mode] * s.steps * n_pad // fit.mesh.size,
               "bytes_per_chip_compiled_shapes": fit.per_chip(fit.live["cache"])})


def format_report(r: dict) -> str:
    c = r["cache"]
    per = c["bytes_per_frame_step"]
    title = (f"FreeAnimate on {r['topology']} ({chips_text(r)}, {r['hbm_bytes'] / GiB:.2f} "
             f"GiB usable per chip): {r['frames']} frames ({r['padded_frames']} computed) at "
             f"{size_text(r['size'])}, {r['settings']['steps']} steps, cache_mode="
             f"{c['mode']}, {r['dtype']}{', tiny models' if r['tiny'] else ''}")
    notes = [
        "IBA cache per frame per step: " + ", ".join(
            f"{m} {per[m] / 2 ** 20:.3f} MiB" for m in per) + f" ({len(c['layers'])} layers)",
        f"IBA cache ({c['mode']}) per chip: {c['bytes_per_chip'] / GiB:.3f} GiB "
        f"({r['settings']['steps']} steps x {r['padded_frames']} frames / {chips_text(r)})"]
    return format_table(r, title, notes)
