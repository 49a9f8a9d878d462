"""`freeanimate fit animate`: does FreeAnimate fit a TPU slice? Answered ahead of time.

The models are built abstractly (shapes only: no download, no init); every pipeline stage is
lowered with the shapes and shardings `FreeAnimate.__call__` gives it onto an abstract TPU
topology (libtpu's compile-only client, so this runs on any host), compiled, and the compiler's
per-chip memory analysis is read back. A program over HBM fails inside the compiler: that is
reported as "does not fit", never guessed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import sys
import time
import types
import typing

TOPOLOGIES = {  # friendly name -> (libtpu topology, its options, chip family)
    "v5e-1": ("v5e:1x1", {}, "v5e"),
    "v5e-4": ("v5e:2x2", {}, "v5e"),
    "v5e-8": ("v5e:2x4", {}, "v5e"),
    # v4/v5p names count TensorCores; JAX runs a chip's two cores as one device (megacore),
    # without which libtpu describes every core as a device with half the chip's HBM.
    "v4-8": ("v4:2x2x1", {"chip_config_name": "megacore"}, "v4"),
    "v4-32": ("v4:2x2x4", {"chip_config_name": "megacore"}, "v4"),
    "v5p-8": ("v5p:2x2x1", {"chip_config_name": "megacore"}, "v5p"),
    "v6e-8": ("v6e:2x4", {}, "v6e"),
}
# family -> (HBM per chip, the part the TPU compiler lets one program use), GiB. The usable
# figures are the compiler's own (its "exceeds available HBM (..G)" errors).
HBM_GIB = {"v5e": (16, 15.75), "v4": (32, 30.75), "v5p": (95, 95.73), "v6e": (32, 31.24)}
STAGES = ("text encoder", "VAE encode", "reference inversion", "preview reference inversion",
          "preview", "preview inversion", "denoise", "VAE decode")
GiB = 2 ** 30


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage; we want one line
        raise UsageError(message)


@dataclasses.dataclass
class StageFit:
    name: str
    args: int = 0
    temps: int = 0
    outputs: int = 0
    alias: int = 0
    code: int = 0
    resident: int = 0  # other live buffers of the pipeline while this stage runs (see below)
    compile_s: float = 0.0
    error: str | None = None

    @property
    def total(self) -> int:
        # Arguments, outputs and temporaries are separate allocations, except that an output
        # aliased to (donated into) an argument reuses its buffer: counted once.
        return self.args + self.temps + self.outputs - self.alias

    @property
    def peak(self) -> int:
        return self.total + self.resident


def parse_settings(items: list[str]):
    """`key=value` overrides of `AnimateSettings`, coerced by the field's annotated type."""
    from freeanimate_jax.pipelines.animate import AnimateSettings

    hints = typing.get_type_hints(AnimateSettings)
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in hints:
            raise UsageError(f"unknown setting {item!r}; expected key=value with key one of "
                             f"{', '.join(hints)}")
        try:
            values[key] = _coerce(text, hints[key])
        except ValueError as e:
            raise UsageError(f"setting {key}={text!r}: {e}") from e
    try:
        return AnimateSettings(**values)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _coerce(text: str, hint):
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:  # e.g. clip_skip: int | None
        if text.lower() in ("", "none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return tuple(p.strip() for p in text.split(",") if p.strip())
    if hint is bool:
        low = text.lower()
        if low not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            raise ValueError("expected true or false")
        return low in ("true", "1", "yes", "on")
    return hint(text)  # int, float, str


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
        _, cap = unet.bind(state)(z, t, ctx, attn=AttnControl(capture_hidden=settings.iba_layers))
        return {p: c["hidden"] for p, c in cap.items()}

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


def fit_animate(topology: str, frames: int, size: int, settings, *, tiny: bool = False,
                hbm_gib: float | None = None, only: set[str] | None = None,
                log=lambda msg: None) -> dict:
    """Lower every stage (later stages take earlier ones' output shapes) and compile those in
    `only` (default: all); returns the report `format_report` prints."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from freeanimate_jax import parallel
    from freeanimate_jax.models.attention import use_kernel
    from freeanimate_jax.pipelines.animate import FreeAnimate
    from freeanimate_jax.pipelines.common import (
        Pure,
        decode_latents,
        encode_latents,
        vae_to_images,
    )

    name, options, family = TOPOLOGIES[topology]
    devices = topologies.get_topology_desc(name, "tpu", **options).devices
    mesh = parallel.make_mesh(devices=devices)
    hbm = int((hbm_gib if hbm_gib is not None else HBM_GIB[family][1]) * GiB)
    dtype = jnp.bfloat16
    models = abstract_models(tiny, dtype)
    s = settings
    fa = FreeAnimate(models, s, mesh=mesh, progress=None)
    te, vae = Pure.of(models.text_encoder), Pure.of(models.vae)
    n_pad, down = parallel.padded_frames(frames, mesh), models.vae.downscale
    h = w = size // down
    rep = parallel.replicated(mesh)

    def place(tree, axis: int | None):
        """Abstract arrays as the pipeline holds them: frames sharded on `axis`, or
        replicated (weights, the reference, prompts, RA-SA anchors)."""
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=rep if axis is None
            else parallel.frame_sharding(mesh, len(a.shape), axis)), tree)

    def per_chip(tree) -> int:
        return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(tree))

    # Everything `__call__` keeps alive, by name: all models' weights for the whole call, and
    # each stage's results until it returns (they are locals there).
    live = {"unet": place(fa.unet.state, None), "controlnet": place(fa.cn.state, None),
            "vae": place(vae.state, None), "text encoder": place(te.state, None),
            "ids": place(jax.ShapeDtypeStruct((2, 77), jnp.int32), None),
            "image": place(jax.ShapeDtypeStruct((1, size, size, 3), dtype), None),
            "poses": place(jax.ShapeDtypeStruct((n_pad, size, size, 3), dtype), 0),
            "noise": place(jax.ShapeDtypeStruct((n_pad, h, w, 4), dtype), 0),
            "no cache": {}}
    fits: list[StageFit] = []

    def stage(label: str, fn, inputs: list[str], outputs: list[tuple[str, int | None]]):
        st = StageFit(label, resident=sum(per_chip(v) for k, v in live.items()
                                          if k not in inputs))
        log(f"{label}: lowering")
        clock = time.perf_counter()
        with use_kernel("tpu_flash"), jax.set_mesh(mesh):
            lowered = fn.lower(*(live[k] for k in inputs))
            out = lowered.out_info if len(outputs) > 1 else (lowered.out_info,)
            for (key, axis), tree in zip(outputs, out, strict=True):
                live[key] = place(tree, axis)
            if only is not None and label not in only:
                return
            fits.append(st)
            log(f"{label}: compiling (lowered in {time.perf_counter() - clock:.0f}s)")
            try:
                mem = lowered.compile().memory_analysis()
            except Exception as e:  # the compiler's HBM check, or anything else it refuses
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                oom = "RESOURCE_EXHAUSTED" in first or "memory" in first.lower()
                st.error = f"{'does not fit' if oom else 'compile error'}: {first}"
            else:
                st.args, st.temps = mem.argument_size_in_bytes, mem.temp_size_in_bytes
                st.outputs, st.alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
                st.code = mem.generated_code_size_in_bytes
        st.compile_s = time.perf_counter() - clock
        log(f"{label}: {st.error or f'{st.peak / GiB:.2f} GiB'} ({st.compile_s:.0f}s)")

    stage("text encoder", jax.jit(lambda p, ids: tuple(
        te.bind(p)(ids, clip_skip=s.clip_skip).astype(dtype)[:, None])),
        ["text encoder", "ids"], [("ctx_c", None), ("ctx_u", None)])
    stage("VAE encode", jax.jit(lambda p, x: encode_latents(vae.bind(p), x)),
          ["vae", "image"], [("z_ref", None)])
    stage("reference inversion", fa.stages["reference inversion"],
          ["unet", "z_ref", "ctx_c"], [("anchors", None)])
    preview_anchors = "anchors"
    if s.preview_steps != s.steps:
        preview_anchors = "preview anchors"
        stage("preview reference inversion", fa.stages["preview reference inversion"],
              ["unet", "z_ref", "ctx_c"], [(preview_anchors, None)])
    weights = ["unet", "controlnet"]
    stage("preview", fa.stages["preview"],
          weights + ["noise", "poses", "ctx_c", "ctx_u", preview_anchors, "no cache"],
          [("z_pre", 0)])
    stage("preview inversion", fa.stages["preview inversion"],
          weights + ["z_pre", "poses", "ctx_c", "anchors"], [("z_t", 0), ("cache", 1)])
    stage("denoise", fa.stages["denoise"],
          weights + ["z_t", "poses", "ctx_c", "ctx_u", "anchors", "cache"], [("z0", 0)])
    stage("VAE decode", jax.jit(lambda p, z: vae_to_images(
        decode_latents(vae.bind(p), z, s.vae_chunk))), ["vae", "z0"], [("frames", 0)])

    per_step = iba_cache(models, s, (h, w), dtype)
    per_frame_step = per_step[s.cache_mode]
    ok = all(st.error is None and st.peak <= hbm for st in fits)
    worst = max(fits, key=lambda st: (st.error is not None, st.peak))
    return {
        "topology": topology, "libtpu_topology": name, "chips": mesh.size,
        "hbm_bytes": hbm, "hbm_nominal_gib": HBM_GIB[family][0], "frames": frames,
        "padded_frames": n_pad, "size": size, "tiny": tiny, "dtype": "bfloat16",
        "settings": dataclasses.asdict(s),
        "stages": [dict(dataclasses.asdict(st), total=st.total, peak=st.peak,
                        fits=st.error is None and st.peak <= hbm) for st in fits],
        "cache": {"mode": s.cache_mode, "layers": per_step["layers"],
                  "bytes_per_frame_step": {m: per_step[m] for m in ("hidden", "maps",
                                                                    "recompute")},
                  # frames are sharded: each chip holds its n_pad / chips frames' cache
                  "bytes_per_chip": per_frame_step * s.steps * n_pad // mesh.size,
                  "bytes_per_chip_compiled_shapes": per_chip(live["cache"])},
        "fits": ok,
        "verdict": (f"fits: every stage within {hbm / GiB:.2f} GiB per chip (largest: "
                    f"{worst.name}, {worst.peak / GiB:.2f} GiB)") if ok else
                   (f"does not fit: {worst.name}: {worst.error.removeprefix('does not fit: ')}"
                    if worst.error else
                    f"does not fit: {worst.name} needs {worst.peak / GiB:.2f} GiB per chip, "
                    f"{(worst.peak - hbm) / GiB:.2f} GiB over {hbm / GiB:.2f} GiB"),
    }


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:9.3f}"  # noqa: E731
    chips = f"{r['chips']} chip{'s' * (r['chips'] > 1)}"
    lines = [f"FreeAnimate on {r['topology']} ({chips}, {r['hbm_bytes'] / GiB:.2f} "
             f"GiB usable per chip): {r['frames']} frames ({r['padded_frames']} computed) at "
             f"{r['size']}px, {r['settings']['steps']} steps, cache_mode="
             f"{r['cache']['mode']}{', tiny models' if r['tiny'] else ''}",
             "GiB per chip: total = args + temps + outputs - aliased; peak = total + the rest "
             "of the pipeline still on the chip (other weights, earlier results)",
             f"{'stage':<28}|{'args':>9} |{'temps':>9} |{'outputs':>9} |{'total':>9} |"
             f"{'peak':>9} | fits | compile"]
    for st in r["stages"]:
        if st["error"]:
            lines.append(f"{st['name']:<28}| {st['error']}")
            continue
        lines.append(f"{st['name']:<28}|{gib(st['args'])} |{gib(st['temps'])} |"
                     f"{gib(st['outputs'])} |{gib(st['total'])} |{gib(st['peak'])} | "
                     f"{'yes' if st['fits'] else 'NO':<4} | {st['compile_s']:.0f}s")
    # Executables live in HBM too, outside the buffers above; jit keeps each stage's loaded.
    lines.append(f"generated code: {gib(sum(st['code'] for st in r['stages'])).strip()} GiB "
                 f"per chip over these stages")
    c = r["cache"]
    per = c["bytes_per_frame_step"]
    lines.append("IBA cache per frame per step: " + ", ".join(
        f"{m} {per[m] / 2 ** 20:.3f} MiB" for m in per) + f" ({len(c['layers'])} layers)")
    lines.append(f"IBA cache ({c['mode']}) per chip: {c['bytes_per_chip'] / GiB:.3f} GiB "
                 f"({r['settings']['steps']} steps x {r['padded_frames']} frames / "
                 f"{chips})")
    lines.append(r["verdict"])
    return "\n".join(lines)


def _progress(message: str) -> None:  # compiles take minutes: say what is going on
    print(f"[fit] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    p = _Parser(prog="freeanimate fit", description="Per-chip HBM of each FreeAnimate stage on "
                "a TPU topology, from an ahead-of-time compile on this host.")
    p.add_argument("pipeline", help="the pipeline to fit: animate")
    p.add_argument("--topology", default="v5e-8", help=", ".join(TOPOLOGIES))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="square frame size, pixels")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tiny", action="store_true", help="the tiny model family (quick checks)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="HBM per chip to fit into (default: the chip's usable HBM)")
    p.add_argument("--stages", default=None,
                   help="compile only these stages (comma-separated; the rest are only traced)")
    p.add_argument("overrides", nargs="*", help="AnimateSettings fields, key=value")
    try:
        a = p.parse_intermixed_args(argv)  # key=value may follow options
        if a.pipeline != "animate":
            raise UsageError(f"unknown pipeline {a.pipeline!r}; expected: animate")
        if a.topology not in TOPOLOGIES:
            raise UsageError(f"unknown topology {a.topology!r}; expected one of "
                             f"{', '.join(TOPOLOGIES)}")
        if a.frames < 1 or a.size < 1 or (a.hbm_gib is not None and a.hbm_gib <= 0):
            raise UsageError("--frames, --size and --hbm-gib must be positive")
        settings = parse_settings(a.overrides)
        only = None if a.stages is None else {x.strip() for x in a.stages.split(",")}
        if only is not None and (not only or not only <= set(STAGES)):
            raise UsageError(f"unknown stage in --stages {a.stages!r}; expected some of "
                             f"{', '.join(STAGES)}")
        if only is not None and settings.preview_steps == settings.steps:
            only.discard("preview reference inversion")  # it runs only for other step counts
            if not only:
                raise UsageError("--stages: preview reference inversion runs only when "
                                 "preview_steps differs from steps")
        # The VAE downsamples 8x and the SD UNet 8x more (the tiny one 2x).
        multiple = 8 * (2 if a.tiny else 8)
        if a.size % multiple:
            raise UsageError(f"--size {a.size} must be a multiple of {multiple}")
    except UsageError as e:
        print(f"freeanimate fit: {e}", file=sys.stderr)
        return 2
    # An ahead-of-time check: run on the CPU even on a TPU host (a real TPU may be busy), and
    # let libtpu's compile-only client load beside another process already holding libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "JAX_PLATFORMS" not in os.environ:
        import jax

        jax.config.update("jax_platforms", "cpu")
    report = fit_animate(a.topology, a.frames, a.size, settings, tiny=a.tiny,
                         hbm_gib=a.hbm_gib, only=only, log=_progress)
    print(json.dumps(report, indent=1) if a.json else format_report(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
