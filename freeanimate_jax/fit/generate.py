"""`freeanimate fit generate`: does AnimateDiff text-to-video fit a TPU slice?

SD 1.5 with a released motion-module layout inserted (v3 by default: no mid-block module, 32
positions), optionally the openpose ControlNet per frame, built abstractly; the stages are the
ones `Generate.__call__` runs, with its shapes and shardings (see `core.Fitter`).
"""

from __future__ import annotations

import dataclasses

from freeanimate_jax.fit.core import Fitter, GiB, chips_text, format_table

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


def fit_generate(topology: str, settings, size: int, *, motion: str = "v3",
                 controlnet: bool = False, tiny: bool = False, hbm_gib: float | None = None,
                 only: set[str] | None = None, log=lambda msg: None) -> dict:
    """Lower and compile (those in `only`; default all) the text encoder, the denoising scan
    and the VAE decode for `settings.frames` frames at `size` px; returns the report."""
    import jax
    import jax.numpy as jnp

    from freeanimate_jax.cli_generate import check_motion_window
    from freeanimate_jax.pipelines.common import Pure
    from freeanimate_jax.pipelines.generate import Generate

    fit = Fitter(topology, hbm_gib=hbm_gib, only=only, log=log)
    s, dtype = settings, jnp.bfloat16
    models = abstract_video_models(tiny, motion, controlnet, dtype)
    gen = Generate(models, s, mesh=fit.mesh, progress=None)  # refuses frames it cannot shard
    # As `freeanimate generate` does: refuse before compiling, not minutes into a trace.
    check_motion_window(models.unet, gen.windows.index.shape[1], "generate",
                        "; give context_length=N (context windows) for longer videos")
    vae = Pure.of(models.vae)
    h = w = size // models.vae.downscale
    place = fit.place
    fit.live.update({
        "unet": place(gen.unet.state, None), "vae": place(vae.state, None),
        "noise": place(jax.ShapeDtypeStruct((s.frames, h, w, 4), dtype), 0)})
    weights = ["unet", "nothing"]
    poses = "nothing"
    if controlnet:
        fit.live["controlnet"] = place(gen.cn.state, None)
        fit.live["poses"] = place(jax.ShapeDtypeStruct((s.frames, size, size, 3), dtype), 0)
        weights, poses = ["unet", "controlnet"], "poses"
    fit.text_encoder_stage(models.text_encoder, s.clip_skip, dtype)
    fit.stage("denoise", gen.denoise, weights + ["noise", "ctx_c", "ctx_u", poses],
              [("z0", 0)])
    fit.vae_decode_stage(vae, "z0", s.vae_chunk)
    leaves = jax.tree_util.tree_flatten_with_path(gen.unet.state)[0]
    return fit.report(
        pipeline="generate", frames=s.frames, padded_frames=s.frames, size=size, tiny=tiny,
        motion=motion, controlnet=controlnet, settings=dataclasses.asdict(s),
        windows=int(gen.windows.count), unet_params=sum(a.size for _, a in leaves),
        motion_params=sum(a.size for p, a in leaves
                          if "motion_modules" in jax.tree_util.keystr(p)))


def format_report(r: dict) -> str:
    s = r["settings"]
    title = (f"AnimateDiff generate on {r['topology']} ({chips_text(r)}, "
             f"{r['hbm_bytes'] / GiB:.2f} GiB usable per chip): {r['frames']} frames at "
             f"{r['size']}px, {s['steps']} steps, guidance {s['guidance_scale']}, "
             f"{'tiny models' if r['tiny'] else 'SD1.5'} + {r['motion']}-layout motion module"
             f"{' + openpose ControlNet' if r['controlnet'] else ''}")
    notes = [f"UNet with motion modules: {r['unet_params']:,} parameters, "
             f"{r['motion_params']:,} of them in motion modules; {r['windows']} context "
             f"window{'s' * (r['windows'] > 1)}"]
    return format_table(r, title, notes)
