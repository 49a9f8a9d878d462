"""What every fit check shares: topologies, the stage-by-stage ahead-of-time compile, the
per-chip accounting and the report.

A stage is lowered with the shapes and shardings its pipeline gives it onto an abstract TPU
topology (libtpu's compile-only client, so this runs on any host), compiled, and the
compiler's per-chip memory analysis is read back. A program over HBM fails inside the
compiler: that is reported as "does not fit", never guessed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

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
GiB = 2 ** 30


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
    repeats: list[str] = dataclasses.field(default_factory=list)  # later stages, same program

    @property
    def total(self) -> int:
        # Arguments, outputs and temporaries are separate allocations, except that an output
        # aliased to (donated into) an argument reuses its buffer: counted once.
        return self.args + self.temps + self.outputs - self.alias

    @property
    def peak(self) -> int:
        return self.total + self.resident


def compile_into(st: StageFit, lowered) -> None:
    """Compile `lowered` for its topology and read the compiler's per-chip memory analysis into
    `st`, or its refusal into `st.error` (over HBM: "does not fit")."""
    try:
        mem = lowered.compile().memory_analysis()
    except Exception as e:  # the compiler's HBM check, or anything else it refuses
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        oom = "RESOURCE_EXHAUSTED" in first_line or "memory" in first_line.lower()
        st.error = f"{'does not fit' if oom else 'compile error'}: {first_line}"
    else:
        st.args, st.temps = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        st.outputs, st.alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
        st.code = mem.generated_code_size_in_bytes


class Fitter:
    """One pipeline's plan on one topology. `live` holds, by name, every abstract buffer the
    pipeline keeps alive (weights for the whole call, each stage's results until the call
    returns); a stage's peak is its own compiled footprint plus the live buffers it does not
    take as arguments.

    Stages are lowered with `Stage.lower`, the entry the run calls them through (the same
    mesh context, the pipeline's own runtime policy): nothing is added here. A stage whose
    program and arguments equal an earlier one's (the preview's VAE decode) is the same compiled
    executable in the run: it is not compiled again, and its peak is counted in that row."""

    def __init__(self, topology: str, *, hbm_gib: float | None = None,
                 only: set[str] | None = None, log=lambda msg: None, training: bool = False):
        from jax.experimental import topologies

        from freeanimate_jax import parallel

        name, options, family = TOPOLOGIES[topology]
        self.topology, self.libtpu_topology, self.family = topology, name, family
        devices = topologies.get_topology_desc(name, "tpu", **options).devices
        # The mesh the run makes: frames over every chip for sampling, data for training.
        self.mesh = parallel.data_mesh(devices) if training else parallel.make_mesh(
            devices=devices)
        self.hbm = int((hbm_gib if hbm_gib is not None else HBM_GIB[family][1]) * GiB)
        self.only, self.log = only, log
        self.live: dict = {}
        self.fits: list[StageFit] = []
        self._seen: dict[Any, StageFit] = {}
        self._placement = None

    def place(self, tree, axis: int | None):
        """Abstract arrays as the pipeline holds them (its `placement`: frames sharded on
        `axis`, or replicated)."""
        import jax

        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=self._placement(a.shape, axis)), tree)

    @staticmethod
    def per_chip(tree) -> int:
        import jax
        import jax.numpy as jnp

        return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(tree))

    def run(self, pipeline, plan, specs: dict[str, tuple[Any, int | None]]) -> None:
        """`pipeline`'s `plan` on its `input_specs` (each buffer: shapes, frame axis or None),
        placed as the pipeline places them."""
        self._placement = pipeline.placement
        for key, (tree, axis) in specs.items():
            self.live[key] = self.place(tree, axis)
        for step in plan:
            self.stage(step)

    def stage(self, step) -> None:
        """Lower `step` on the live buffers it names, record its outputs under their names
        (sharded on the frame axis given, or replicated), and compile it unless `only` leaves
        it out."""
        import jax

        label, args = step.name, [self.live[k] for k in step.inputs]
        st = StageFit(label, resident=sum(self.per_chip(v) for k, v in self.live.items()
                                          if k not in step.inputs))
        self.log(f"{label}: lowering")
        clock = time.perf_counter()
        lowered = step.stage.lower(*args)
        out = lowered.out_info if len(step.outputs) > 1 else (lowered.out_info,)
        for (key, axis), tree in zip(step.outputs, out, strict=True):
            self.live[key] = self.place(tree, axis)
        key = (step.stage.fn, step.stage.program, str(jax.tree.map(
            lambda a: (a.shape, a.dtype, a.sharding), args)))
        if (first := self._seen.get(key)) is not None:  # the run reuses that executable
            first.repeats.append(label)
            first.resident = max(first.resident, st.resident)
            self.log(f"{label}: the program of {first.name} again")
            return
        if self.only is not None and label not in self.only:
            return
        self.fits.append(st)
        self._seen[key] = st
        self.log(f"{label}: compiling (lowered in {time.perf_counter() - clock:.0f}s)")
        compile_into(st, lowered)
        st.compile_s = time.perf_counter() - clock
        self.log(f"{label}: {st.error or f'{st.peak / GiB:.2f} GiB'} ({st.compile_s:.0f}s)")

    def report(self, **fields) -> dict:
        ok = all(st.error is None and st.peak <= self.hbm for st in self.fits)
        worst = max(self.fits, key=lambda st: (st.error is not None, st.peak))
        hbm = self.hbm
        return {
            "topology": self.topology, "libtpu_topology": self.libtpu_topology,
            "chips": self.mesh.size, "hbm_bytes": hbm,
            "hbm_nominal_gib": HBM_GIB[self.family][0], **fields,
            "stages": [dict(dataclasses.asdict(st), total=st.total, peak=st.peak,
                            fits=st.error is None and st.peak <= hbm) for st in self.fits],
            "fits": ok,
            "verdict": (f"fits: every stage within {hbm / GiB:.2f} GiB per chip (largest: "
                        f"{worst.name}, {worst.peak / GiB:.2f} GiB)") if ok else
                       (f"does not fit: {worst.name}: "
                        f"{worst.error.removeprefix('does not fit: ')}" if worst.error else
                        f"does not fit: {worst.name} needs {worst.peak / GiB:.2f} GiB per "
                        f"chip, {(worst.peak - hbm) / GiB:.2f} GiB over {hbm / GiB:.2f} GiB"),
        }


def format_table(r: dict, title: str, notes: list[str]) -> str:
    """The report as text: `title`, the per-stage table, `notes`, the verdict."""
    gib = lambda b: f"{b / GiB:9.3f}"  # noqa: E731
    lines = [title,
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
    lines += [f"{st['name']}: also {', '.join(st['repeats'])} (the same compiled program; its "
              f"peak counted above)" for st in r["stages"] if st["repeats"]]
    # Executables live in HBM too, outside the buffers above; jit keeps each stage's loaded.
    lines.append(f"generated code: {gib(sum(st['code'] for st in r['stages'])).strip()} GiB "
                 f"per chip over these stages")
    return "\n".join([*lines, *notes, r["verdict"]])


def size_text(size: list[int]) -> str:
    return f"{size[0]}px" if size[0] == size[1] else f"{size[0]}x{size[1]}px"


def chips_text(r: dict) -> str:
    return f"{r['chips']} chip{'s' * (r['chips'] > 1)}"
