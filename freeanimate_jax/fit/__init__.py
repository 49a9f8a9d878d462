"""`freeanimate fit animate|generate`: does a pipeline fit a TPU slice? Answered ahead of time,
on any host, from the TPU compiler's own per-chip memory analysis (`core`). The command line
is `freeanimate_jax/cli/fit.py`."""

from freeanimate_jax.fit.core import TOPOLOGIES, GiB

__all__ = ["TOPOLOGIES", "GiB"]
