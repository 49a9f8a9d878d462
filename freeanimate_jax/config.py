"""Job configuration of `freeanimate animate`, `generate` and `fit`: typed frozen dataclasses,
YAML files and `key=value` overrides. Free of JAX: the command line checks its arguments with
it before any device work.

Layers, later wins: the dataclass defaults, an optional `base` mapping (the demo's defaults),
the YAML file, `flags` (the CLI's typed options such as --prompt) and finally the `key=value`
overrides. Loading is strict: an unknown key, a value of the wrong type or an out-of-range value
is a ConfigError with one line that names the key and says what was expected.

The two jobs share their top-level keys (models, size, dtype, caches, ...). Each has one
settings section generated from its pipeline's settings class, so the two never drift:
`animate:` is every field of `AnimateSettings`, `generate:` every field of `GenerateSettings`;
tuples become lists, which is what YAML and omegaconf hold. `scheduler:` likewise holds every
field of the DDIM `SchedulerConfig`, each null by default: set ones replace the model folder's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, List, Optional, Union  # noqa: UP035 (omegaconf 2.3)

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from freeanimate_jax.diffusion.scheduler_config import SchedulerConfig
from freeanimate_jax.pipelines.settings import AnimateSettings, GenerateSettings
from freeanimate_jax.train import settings as train_settings

SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
OPENPOSE_CONTROLNET = "lllyasviel/control_v11p_sd15_openpose"
MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"  # AnimateDiff v2, diffusers layout
MOTION_EXPECTED = ("an AnimateDiff motion module for SD 1.5: a diffusers MotionAdapter folder or "
                   "hub id, or a released .ckpt/.safetensors file")
# Selects the tiny random family of `freeanimate_jax.demo` (no download). Hub ids never contain
# a colon, so it cannot shadow one.
TINY_MODEL = "builtin:tiny"
# The toy family trained on the toy world (`freeanimate_jax/toy`), shipped in the package:
# model, controlnet and motion_module all name it; its files are hash-checked at load.
TOY_MODEL = "builtin:toy"
DTYPES = ("auto", "float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming the key."""


def default_compilation_cache() -> str:
    """JAX's own env var if set, else `freeanimate_jax/xla` under the user cache folder."""
    if env := os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return str(Path(base) / "freeanimate_jax" / "xla")


def _config_type(tp: Any) -> Any:
    """AnimateSettings annotation -> one omegaconf accepts on every supported version."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[_config_type(inner)]  # noqa: UP045 (omegaconf 2.3 wants typing's)
    if origin is tuple:
        return typing.List[args[0]]  # noqa: UP006 (omegaconf 2.3 wants typing's)
    return tp


def _section(name: str, settings: type, *, overrides: bool = False) -> type:
    """A frozen config section with the fields of the dataclass `settings`; `overrides`: every
    field optional and null by default (only the keys set replace another config's)."""
    hints = typing.get_type_hints(settings)
    fields = []
    ordered = getattr(settings, "ordered_fields", lambda: dataclasses.fields(settings))
    for f in ordered():
        tp = _config_type(hints[f.name])
        if overrides:
            field = dataclasses.field(default=None)
            tp = Optional[tp]  # noqa: UP045
        elif isinstance(f.default, tuple):
            field = dataclasses.field(default_factory=lambda d=f.default: list(d))
        elif f.default_factory is not dataclasses.MISSING:
            field = dataclasses.field(default_factory=f.default_factory)
        else:
            field = dataclasses.field(default=f.default)
        fields.append((f.name, tp, field))
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = __name__  # so it pickles and prints as ours
    cls.__doc__ = f"{settings.__name__}'s fields{', each null by default' if overrides else ''}."
    return cls


AnimateConfig = _section("AnimateConfig", AnimateSettings)
DataSection = _section("DataSection", train_settings.DataConfig)
NoiseSection = _section("NoiseSection", train_settings.NoiseConfig)
OptimSection = _section("OptimSection", train_settings.OptimConfig)
LoopSection = _section("LoopSection", train_settings.LoopConfig)
ValSection = _section("ValSection", train_settings.ValConfig)
GenerateConfig = _section("GenerateConfig", GenerateSettings)
SchedulerOverrides = _section("SchedulerOverrides", SchedulerConfig, overrides=True)


def parse_weighted(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); a tail that is not a number stays part of the path (so
    `C:\\x.ckpt` is a path)."""
    path, _, tail = spec.rpartition(":")
    with contextlib.suppress(ValueError):
        return (path, float(tail)) if path else (spec, 1.0)
    return spec, 1.0


@dataclasses.dataclass(frozen=True)
class Job:
    """The top-level keys both commands share; subclasses add their settings section."""

    SECTION: ClassVar[str] = ""
    SETTINGS: ClassVar[type] = object

    model: str = SD15_MODEL  # diffusers SD folder or hub id; `builtin:tiny` = the demo family
    controlnet: str = OPENPOSE_CONTROLNET
    prompt: str = ""
    size: Any = 512  # model resolution: an int or [H, W], multiples of 8
    fps: float = 8.0
    dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    compilation_cache: str = dataclasses.field(default_factory=default_compilation_cache)
    weights_cache: str = ""  # folder for converted (orbax) weights; "" = convert every run
    sheet_rows: int = 4
    motion_module: str = ""  # AnimateDiff module: diffusers folder/hub id or released file
    motion_lora: List[str] = dataclasses.field(default_factory=list)  # noqa: UP006  FILE[:SCALE]
    domain_adapter: str = ""  # AnimateDiff v3's spatial LoRA, FILE[:SCALE]
    lora: List[str] = dataclasses.field(default_factory=list)  # noqa: UP006  SD LoRAs
    scheduler: SchedulerOverrides = dataclasses.field(default_factory=SchedulerOverrides)

    @property
    def size_hw(self) -> tuple[int, int]:
        if isinstance(self.size, int):
            return (self.size, self.size)
        return (int(self.size[0]), int(self.size[1]))

    def settings(self) -> Any:
        """The section as the pipeline's settings (lists back to tuples)."""
        values = dataclasses.asdict(getattr(self, self.SECTION))
        return self.SETTINGS(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in values.items()})

    def scheduler_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self.scheduler).items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists, not tuples)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AnimateJob(Job):
    """Everything `freeanimate animate` needs besides the input and output paths."""

    SECTION: ClassVar[str] = "animate"
    SETTINGS: ClassVar[type] = AnimateSettings

    frames: Optional[int] = None  # noqa: UP045  use the first N poses; null = all of them
    animate: AnimateConfig = dataclasses.field(default_factory=AnimateConfig)


@dataclasses.dataclass(frozen=True)
class GenerateJob(Job):
    """Everything `freeanimate generate` needs besides the output path."""

    SECTION: ClassVar[str] = "generate"
    SETTINGS: ClassVar[type] = GenerateSettings

    controlnet: str = ""  # optional here: a per-frame ControlNet driven by --poses
    motion_module: str = MOTION_ADAPTER
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)


NEW_CONTROLNET = "new"  # train: a new ControlNet made from the base UNet (diffusers' from_unet)


@dataclasses.dataclass(frozen=True)
class TrainJob(Job):
    """Everything `freeanimate train run` needs: the frozen base, the module to train (a new
    zero-initialised one when `motion_module` is empty), data, noise, optimizer, loop and
    validation sections (`train/settings.py`)."""

    SECTION: ClassVar[str] = "train"
    SETTINGS: ClassVar[type] = train_settings.LoopConfig

    controlnet: str = ""  # a ControlNet to train (train.motion=none); "new": from the UNet
    motion_module: str = ""  # "" = a new module of layout train.motion, proj_out zeroed
    size: Any = 256  # training size: the short side is resized to it, then centre-cropped
    data: DataSection = dataclasses.field(default_factory=DataSection)
    noise: NoiseSection = dataclasses.field(default_factory=NoiseSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: LoopSection = dataclasses.field(default_factory=LoopSection)
    val: ValSection = dataclasses.field(default_factory=ValSection)

    def sections(self) -> tuple[Any, Any, Any, Any, Any]:
        """(data, noise, optim, loop, val) as `train.settings` dataclasses, checked."""
        def make(cls, section):
            values = {k: list(v) if isinstance(v, list | tuple) else v
                      for k, v in dataclasses.asdict(section).items()}
            return cls(**values)

        ts = train_settings
        out = (make(ts.DataConfig, self.data), make(ts.NoiseConfig, self.noise),
               make(ts.OptimConfig, self.optim), make(ts.LoopConfig, self.train),
               make(ts.ValConfig, self.val))
        ts.check(*out)
        return out

    def settings(self) -> Any:
        return self.sections()[3]


DEMO_TRAIN_CONFIG: dict[str, Any] = {
    # Mirrored by configs/train_motion_tiny.yaml. The tiny family, frozen, a new tiny module,
    # the synthetic moving shapes: learns on a CPU in a few minutes.
    "model": TINY_MODEL,
    "size": 64,
    "dtype": "float32",
    "data": {"source": "synthetic", "frames": 8, "stride": 1, "synthetic_videos": 64,
             "synthetic_frames": 12, "caption_dropout": 0.1},
    "optim": {"lr": 1e-3, "weight_decay": 0.0},
    "train": {"batch_per_chip": 4, "max_steps": 200, "ckpt_every": 50, "log_every": 10,
              "output_dir": "runs/demo-train"},
    "val": {"every": 100, "prompts": ["a red square moving left"], "seeds": [0], "steps": 8,
            "guidance": 4.0, "frames": 8},
}


DEMO_CAPTION = "a person in a red shirt and grey trousers on a green background"
DEMO_CONFIG: dict[str, Any] = {
    # Mirrored by configs/demo.yaml (the runbook); a test keeps the two equal. Kept in code so
    # `--demo` works from an installed package, which does not ship configs/.
    # The toy family animates a held-out figure (`toy.data.demo_case`, whose caption is the
    # prompt; a test keeps them equal) through the held-out motion.
    "model": TOY_MODEL,
    "controlnet": TOY_MODEL,
    "prompt": DEMO_CAPTION,
    "size": 64,
    "fps": 8.0,
    "dtype": "float32",
    "sheet_rows": 4,
    # Every preview frame starts from the reference's DDIM inversion: the reference's colours
    # and background seed each frame (docs/QUALITY.md: from per-frame noise they drift).
    "animate": {"steps": 20, "preview_steps": 20, "guidance_scale": 5.0, "seed": 0,
                "preview_from_reference": 1.0},
}
DEMO_GENERATE_CONFIG: dict[str, Any] = {
    # Mirrored by configs/demo_generate.yaml, as DEMO_CONFIG by demo.yaml.
    "model": TOY_MODEL,
    "motion_module": TOY_MODEL,
    "prompt": DEMO_CAPTION,
    "size": 64,
    "fps": 8.0,
    "dtype": "float32",
    "sheet_rows": 4,
    "generate": {"frames": 16, "steps": 20, "guidance_scale": 5.0, "seed": 0},
}


# -- schema walking -----------------------------------------------------------------------------
def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_name(prefix: str) -> str:
    return f"section '{prefix}'" if prefix else "the top level"


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _keys_of(prefix: str) -> str:
    return f"the keys of section '{prefix}'" if prefix else "the top-level keys"


def _lookup(key: str, schema: type[Job]) -> Any:
    """The declared type of a dotted key; ConfigError naming the first unknown part."""
    cls: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        fields = _fields(cls) if dataclasses.is_dataclass(cls) else None
        if fields is None:
            raise ConfigError(f"config key '{key}': '{prefix}' is a value, not a section; "
                              f"expected '{prefix}=...'")
        if part not in fields:
            raise ConfigError(_unknown(".".join(parts[: i + 1]), prefix, fields, schema))
        cls = fields[part]
    return cls


def _unknown(key: str, prefix: str, fields: Mapping[str, Any], schema: type[Job]) -> str:
    hint = ""
    leaf = key.rsplit(".", 1)[-1]
    if not prefix and leaf in _fields(_fields(schema)[schema.SECTION]):
        hint = f" (did you mean '{schema.SECTION}.{leaf}'?)"
    return (f"unknown config key '{key}'{hint}; expected one of {_keys_of(prefix)}: "
            f"{', '.join(fields)}")


def _check_keys(tree: Any, schema: type[Job], prefix: str = "") -> None:
    cls = _lookup(prefix, schema) if prefix else schema
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config {_section_name(prefix)} is {_a(type(tree).__name__)}; "
                          f"expected a mapping of keys to values")
    fields = _fields(cls)
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(_unknown(full, prefix, fields, schema))
        if dataclasses.is_dataclass(fields[key]):
            _check_keys(value, schema, full)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union and type(None) in args:
        return f"{_describe(next(a for a in args if a is not type(None)))} or null"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return names.get(tp, "a value")


# -- loading ------------------------------------------------------------------------------------
def _read_yaml(path: str) -> dict[str, Any]:
    import yaml  # omegaconf's own dependency

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file; expected a YAML file")
    try:
        tree = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: malformed YAML ({first}); expected a mapping of keys") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level is {_a(type(tree).__name__)}; expected a mapping")
    return tree


def _parse_overrides(overrides: Sequence[str], schema: type[Job]) -> list[dict[str, Any]]:
    layers = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key != key.strip():
            raise ConfigError(f"override {item!r} is not key=value; expected e.g. "
                              f"{schema.SECTION}.steps=30")
        tp = _lookup(key, schema)
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {item!r} sets the whole section '{key}'; expected "
                              f"'{key}.<key>=value'")
        # A string field takes the text verbatim: YAML would turn `prompt=yes` into True.
        if tp is str or tp == Optional[str]:  # noqa: UP045
            value: Any = raw
        elif key in ("lora", "motion_lora") and not raw.startswith("["):
            value = [raw] if raw else []  # lora=a.safetensors: a list of one, verbatim
        else:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        for part in reversed(key.split(".")):
            value = {part: value}
        layers.append(value)
    return layers


def _type_error(e: OmegaConfBaseException, layers: Sequence[Mapping[str, Any]],
                schema: type[Job]) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    try:
        expected = _describe(_lookup(key, schema)) if key else "the documented types"
    except ConfigError:
        expected = "the documented types"
    # Name the offending value as the user wrote it (the last layer that set it wins).
    value, found = None, False
    for layer in layers:
        node: Any = layer
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING:
            value, found = node, True
    if not found:
        msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        return ConfigError(f"config key '{key}': {msg}; expected {expected}")
    return ConfigError(f"config key '{key}' = {value!r} has the wrong type; expected {expected}")


_MISSING = object()


def _validate(job: Job) -> None:
    size = job.size
    sides = list(size) if isinstance(size, list | tuple) and len(size) == 2 else [size]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise ConfigError(f"size={size!r}; expected an integer or [height, width]")
    if any(s < 8 or s % 8 for s in sides):
        raise ConfigError(f"size={size!r} is not a multiple of 8; expected a positive multiple "
                          f"of 8 (e.g. 512 or [512, 384]): the VAE downsamples 8x")
    if getattr(job, "frames", None) is not None and job.frames < 1:
        raise ConfigError(f"frames={job.frames}: no poses to animate; expected a pose count of "
                          f"at least 1, or null for all poses")
    if not (math.isfinite(job.fps) and job.fps > 0):
        raise ConfigError(f"fps={job.fps}; expected a positive number")
    if job.dtype not in DTYPES:
        raise ConfigError(f"dtype={job.dtype!r}; expected one of {', '.join(DTYPES)}")
    if job.sheet_rows < 1:
        raise ConfigError(f"sheet_rows={job.sheet_rows}; expected at least 1")
    section = getattr(job, job.SECTION)  # named by its dotted key (the settings check it too)
    if hasattr(section, "vae_chunk") and section.vae_chunk < 1:
        raise ConfigError(f"{job.SECTION}.vae_chunk={section.vae_chunk}; expected at least 1")
    # The tiny family only fits itself; an empty controlnet (generate) is no ControlNet.
    if isinstance(job, AnimateJob) and not job.controlnet:
        raise ConfigError("controlnet='': FreeAnimate needs one; expected an openpose "
                          "ControlNet folder or hub id")
    if isinstance(job, TrainJob) and job.controlnet and (job.motion_module
                                                         or job.train.motion != "none"):
        raise ConfigError(f"controlnet={job.controlnet!r} trains on frames as images; expected "
                          f"train.motion=none and no motion_module")
    if job.controlnet not in ("", NEW_CONTROLNET) and (
            (job.model == TINY_MODEL) != (job.controlnet == TINY_MODEL)):
        raise ConfigError(f"model={job.model!r} with controlnet={job.controlnet!r}; expected "
                          f"both or neither to be {TINY_MODEL!r} (the tiny demo family)")
    for key in ("controlnet", "motion_module"):  # the toy parts fit only the toy model, and
        value = getattr(job, key)                # the toy model only its own parts
        if (value == TOY_MODEL) != (job.model == TOY_MODEL) and value not in ("",
                                                                                NEW_CONTROLNET):
            raise ConfigError(f"model={job.model!r} with {key}={value!r}; expected both or "
                              f"neither to be {TOY_MODEL!r} (the toy family)")
    if job.motion_module == TINY_MODEL != job.model:
        raise ConfigError(f"motion_module={TINY_MODEL!r} with model={job.model!r}; expected "
                          f"model={TINY_MODEL!r} too: the tiny motion module fits only it")
    if isinstance(job, GenerateJob) and not job.motion_module:
        raise ConfigError("motion_module='': generate needs one; expected " + MOTION_EXPECTED)
    if job.motion_lora and not job.motion_module:
        raise ConfigError("motion_lora without a motion_module; expected --motion-module too")
    if any(not spec for spec in [*job.lora, *job.motion_lora]):
        raise ConfigError("an empty LoRA entry in lora/motion_lora; expected FILE[:SCALE]")
    try:
        SchedulerConfig(**job.scheduler_overrides())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"scheduler: {str(e).removeprefix('scheduler config: ')}; expected "
                          f"diffusers DDIMScheduler values") from None
    try:
        job.settings()
    except ValueError as e:
        raise ConfigError(str(e) if isinstance(job, TrainJob) else f"{job.SECTION}: {e}"
                          ) from None


def load_job(config_file: str | None, overrides: Sequence[str] = (), *,
             base: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None,
             schema: type[Job] = AnimateJob) -> Any:
    """Defaults < `base` < the YAML file < `flags` < `key=value` overrides -> a validated job of
    type `schema` (AnimateJob or GenerateJob)."""
    items = [("flag", dict(flags or {})), *(("override", o) for o in overrides)]
    return load_job_sourced(config_file, items, base=base, schema=schema)[0]


def load_job_sourced(config_file: str | None, items: Sequence[tuple[str, Any]], *,
                     base: Mapping[str, Any] | None = None, schema: type[Job] = AnimateJob,
                     base_label: str = "demo") -> tuple[Any, dict[str, str]]:
    """Defaults < `base` < the YAML file < `items` in their order, each ("flag", mapping) or
    ("override", "key=value"): the later wins. Returns the validated job and where each of its
    leaf keys came from ("default", `base_label`, "runbook", "flag" or "override")."""
    labelled = [(base_label, dict(base or {}))]
    if config_file:
        labelled.append(("runbook", _read_yaml(config_file)))
    for _, layer in labelled:
        _check_keys(layer, schema)
    for label, item in items:
        if label == "override":
            labelled += [("override", x) for x in _parse_overrides([item], schema)]
        else:
            _check_keys(item, schema)
            labelled.append((label, dict(item)))
    layers = [layer for _, layer in labelled]
    structured = OmegaConf.structured(schema)
    OmegaConf.set_readonly(structured, False)  # frozen dataclasses give read-only schemas
    try:
        merged = OmegaConf.merge(structured, *[OmegaConf.create(layer) for layer in layers])
        job = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _type_error(e, layers, schema) from None
    # omegaconf leaves lists as ListConfig-derived values; make them plain.
    job = dataclasses.replace(job, lora=list(job.lora), motion_lora=list(job.motion_lora))
    if isinstance(job.size, list | tuple):
        job = dataclasses.replace(job, size=list(job.size))
    _validate(job)
    sources = dict.fromkeys(_leaf_keys(job.to_dict()), "default")
    for label, layer in labelled:
        for key in _leaf_keys(layer):
            sources[key] = label
    return job, sources


def _leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        out += _leaf_keys(value, full) if isinstance(value, Mapping) else [full]
    return out
