"""`freeanimate fit animate|generate`: does a pipeline fit a TPU slice? Answered ahead of time,
on any host, from the TPU compiler's own per-chip memory analysis (`core`)."""

from freeanimate_jax.fit.cli import main
from freeanimate_jax.fit.core import TOPOLOGIES, GiB, UsageError, parse_settings

__all__ = ["TOPOLOGIES", "GiB", "UsageError", "main", "parse_settings"]
