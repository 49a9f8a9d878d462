"""The progress display of long stages (free of JAX: the command line subclasses it)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    """Stage / step / ETA, fed from inside scans through a host callback.

    The ETA uses the step rate after a stage's first step: that callback arrives only once the
    stage has compiled, so timing from the stage's start would bill compilation to every
    remaining step. Subclasses choose how a line is shown (`show`).

    JAX does not persist compiled programs that call back to the host, so a stage compiled with
    progress on is recompiled by the next process; compile with it off (`enabled=False`) where
    the persistent compilation cache matters more than the display (scripts, pod jobs).
    """

    def __init__(self, enabled: bool = True, write: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.write = write or (lambda s: print(s, end="", flush=True))
        self.totals: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def stage(self, name: str, total: int) -> None:
        self.totals[name] = total
        self.first.pop(name, None)

    def __call__(self, name: str, step: int) -> None:
        if not self.enabled or name not in self.totals:
            return
        now, done, total = time.perf_counter(), int(step) + 1, self.totals[name]
        if done == 1 or name not in self.first:
            self.first[name] = now
        rate = (now - self.first[name]) / max(1, done - 1)
        eta = "done" if done == total else \
            f"ETA {rate * (total - done):.1f}s" if done > 1 else "ETA ..."
        self.show(f"{name}: step {done}/{total}  {eta}  (elapsed {now - self.t0:.1f}s)",
                  done == total)

    def show(self, line: str, finished: bool) -> None:
        self.write("\r" + line.ljust(72) + ("\n" if finished else ""))
