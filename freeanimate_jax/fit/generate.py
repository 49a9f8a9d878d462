"""`freeanimate fit generate`: does AnimateDiff text-to-video fit a TPU slice?

SD 1.5 with a released motion-module layout inserted (v3 by default: no mid-block module, 32
positions), optionally the openpose ControlNet per frame, built abstractly; the stages are the
ones `Generate.__call__` runs, with its shapes and shardings (see `core.Fitter`).
"""

from __future__ import annotations

import dataclasses

from freeanimate_jax.fit.core import Fitter, GiB, chips_text, format_table, size_text

STAGES = ("text encoder", "denoise", "VAE decode")
MOTION_VERSIONS = ("v1", "v2", "v3")


def abstract_video_models(tiny: bool, version: str, controlnet: bool, dtype):
    """SD 1.5 + the `version` motion-module layout (or the tiny family with a tiny adapter of
    that layout), shapes only, with the released modules' per-frame GroupNorm."""
    from freeanimate_jax import demo
    from freeanimate_jax.fit.animate import abstract_models
    from freeanimate_jax.models import known_configs as kc
    from freeanimate_jax.models.motion import UNetMotionModel
    from freeanimate_jax.weights.loader import build

    base = abstract_models(tiny, dtype)
    config = kc.SD15_MOTION_ADAPTERS[version]
    if tiny:
        config = dict(demo.TINY_MOTION, use_motion_mid_block=config["use_motion_mid_block"],
                      motion_max_seq_length=config["motion_max_seq_length"])
    adapter = build(config, param_dtype=dtype, abstract=True, norm_per_frame=True,
                    resnet_norm_across_frames=version == "v1")
    unet = UNetMotionModel.from_unet2d(base.unet, adapter)
    return dataclasses.replace(base, unet=unet,
                               controlnet=base.controlnet if controlnet else None)


def fit_generate(topology: str, settings, size_hw: tuple[int, int], *, motion: str = "v3",
                 controlnet: bool = False, tiny: bool = False, dtype: str = "bfloat16",
                 hbm_gib: float | None = None, only: set[str] | None = None,
                 log=lambda msg: None) -> dict:
    """Lower and compile (those in `only`; default all) the stages `Generate.__call__` runs for
    `settings.frames` frames at `size_hw`; returns the report."""
    import jax
    import jax.numpy as jnp

    from freeanimate_jax.models.motion import position_limit
    from freeanimate_jax.pipelines.generate import Generate

    fit = Fitter(topology, hbm_gib=hbm_gib, only=only, log=log)
    s, dtype = settings, jnp.dtype(dtype)
    models = abstract_video_models(tiny, motion, controlnet, dtype)
    gen = Generate(models, s, mesh=fit.mesh, progress=None)  # refuses frames it cannot shard
    # As `freeanimate generate` does: refuse before compiling, not minutes into a trace.
    window, limit = gen.windows().index.shape[1], position_limit(models.unet)
    if limit is not None and window > limit:
        raise ValueError(f"{window} frames exceed the motion module's position table "
                         f"({limit}); give generate.context_length=N (context windows) for "
                         f"longer videos")
    fit.run(gen, gen.plan(s, controlnet), gen.input_specs(size_hw, s, controlnet))
    leaves = jax.tree_util.tree_flatten_with_path(gen.pure["unet"].state)[0]
    return fit.report(
        dtype=dtype.name, pipeline="generate", frames=s.frames, padded_frames=s.frames,
        size=list(size_hw), tiny=tiny, motion=motion, controlnet=controlnet,
        settings=dataclasses.asdict(s),
        windows=int(gen.windows().count), unet_params=sum(a.size for _, a in leaves),
        motion_params=sum(a.size for p, a in leaves
                          if "motion_modules" in jax.tree_util.keystr(p)))


def format_report(r: dict) -> str:
    s = r["settings"]
    title = (f"AnimateDiff generate on {r['topology']} ({chips_text(r)}, "
             f"{r['hbm_bytes'] / GiB:.2f} GiB usable per chip): {r['frames']} frames at "
             f"{size_text(r['size'])}, {r['dtype']}, {s['steps']} steps, guidance "
             f"{s['guidance_scale']}, "
             f"{'tiny models' if r['tiny'] else 'SD1.5'} + {r['motion']}-layout motion module"
             f"{' + openpose ControlNet' if r['controlnet'] else ''}")
    notes = [f"UNet with motion modules: {r['unet_params']:,} parameters, "
             f"{r['motion_params']:,} of them in motion modules; {r['windows']} context "
             f"window{'s' * (r['windows'] > 1)}"]
    return format_table(r, title, notes)
