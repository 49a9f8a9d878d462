"""Training checkpoints with orbax: only what trains, async, atomic, every N steps, keep K.

Items of a step: `params` (the trained parameters, fp32), `opt` (their optimizer state), `ema`
(when on) and `record` (JSON: step, data position, config, base model identity, versions). A
save in progress lives in `<step>.orbax-checkpoint-tmp` and is renamed to `<step>` when it is
complete, so a killed save is never picked up; leftovers are removed at the next save.

Test-only switch: `FREEANIMATE_TEST_PAUSE_SAVE=N` makes the asynchronous save of step N stop,
after its arrays are written and before it is committed, and print `paused saving step N`: a
test kills the process there, deterministically "during an async save".
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import handlers

from freeanimate_jax import parallel

PAUSE_ENV = "FREEANIMATE_TEST_PAUSE_SAVE"
ARRAY_ITEMS = ("params", "opt", "ema")


class _Paused:
    """A commit future that never completes (the test kills the process while it waits)."""

    def __init__(self, step: int):
        self.step = step

    def result(self, timeout: float | None = None) -> None:
        print(f"paused saving step {self.step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


class RecordHandler(handlers.JsonCheckpointHandler):
    """orbax's JSON handler; under the test switch, its async save holds the commit."""

    async def async_save(self, directory, *args, **kwargs):
        futures = await super().async_save(directory, *args, **kwargs)
        pause = os.environ.get(PAUSE_ENV)
        step = Path(str(directory)).parent.name.split(".")[0]
        if pause and step == pause:
            futures = [*(futures or []), _Paused(int(step))]
        return futures


@ocp.args.register_with_handler(RecordHandler, for_save=True)
@dataclasses.dataclass
class RecordSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(RecordHandler, for_restore=True)
@dataclasses.dataclass
class RecordRestore(ocp.args.CheckpointArgs):
    item: dict | None = None


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """A run's checkpoint folder."""

    def __init__(self, directory: str | Path, *, keep: int, asynchronous: bool = True):
        self.directory = Path(directory).expanduser().absolute()  # orbax wants absolute paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True, create=True)
        # The items a checkpoint may hold, named so their metadata can be read back (`read`).
        handlers_by_item = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
        self.manager = ocp.CheckpointManager(os.fspath(self.directory), options=options,
                                             item_handlers={**handlers_by_item,
                                                            "record": RecordHandler()})

    def steps(self) -> list[int]:
        """Complete checkpoints only (partial ones are never listed)."""
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        step = int(record["step"])
        items = {k: ocp.args.StandardSave(v) for k, v in state.items() if k != "step"}
        self.manager.save(step, args=ocp.args.Composite(**items, record=RecordSave(record)),
                          force=True)

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """The state saved at `step`, shaped and placed like `like`, and its record."""
        if step not in self.steps():
            from freeanimate_jax.data.errors import DataError  # a user error: exit status 2

            raise DataError(f"no complete checkpoint for step {step} in {self.directory}; "
                             f"expected one of {self.steps() or 'none'}")
        items = {k: ocp.args.StandardRestore(_abstract(v)) for k, v in like.items()
                 if k != "step"}
        out = self.manager.restore(step, args=ocp.args.Composite(**items,
                                                                 record=RecordRestore()))
        record = dict(out["record"])
        state = {k: out[k] for k in items}
        state["step"] = parallel.put(np.int32(record["step"]), like["step"].sharding)
        return state, record

    def read(self, step: int, item: str) -> Any:
        """One array item of a checkpoint (`params`, `opt`, `ema`) on this process's first
        device, whatever devices or hosts wrote it: a module trained on a pod slice is
        exported or inspected on one machine."""
        meta = self.manager.item_metadata(step)[item]
        if meta is None:
            from freeanimate_jax.data.errors import DataError

            raise DataError(f"the checkpoint of step {step} in {self.directory} has no "
                            f"{item!r}; expected one of {', '.join(ARRAY_ITEMS)}")
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                              meta)
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(target)}))
        return out[item]

    def drop_after(self, step: int) -> list[int]:
        """Delete the complete checkpoints after `step` (a run resumed from an earlier step
        writes them again; orbax refuses to save over a step); the steps deleted."""
        later = [s for s in self.steps() if s > step]
        for s in later:
            self.manager.delete(s)
        return later

    def record(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(record=RecordRestore()))
        return dict(out["record"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
