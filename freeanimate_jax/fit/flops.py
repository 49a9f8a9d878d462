"""FLOPs of a program, counted from its jaxpr: every matrix product and convolution, as 2 x
multiply-adds, through nested calls, remat and scans (a scan's body counted once per step).

Element-wise work (norms, activations, softmax) is left out, as MFU conventions do; it is a few
percent of a UNet's FLOPs. Pallas kernels are opaque here, so count a program traced with the
XLA attention path (the same math)."""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jcore


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> int:
    dn = eqn.params["dimension_numbers"]
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    # rhs spec: (out feature dim, in feature dim, spatial dims...)
    in_features = rhs[dn.rhs_spec[1]]
    spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return 2 * math.prod(out) * in_features * spatial


def _sub_jaxprs(value: Any):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def count(jaxpr) -> int:
    """FLOPs of matrix products and convolutions in `jaxpr` (a Jaxpr or ClosedJaxpr)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        inner = sum(count(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
        if name == "scan":
            inner *= eqn.params["length"]
        total += inner
    return total
