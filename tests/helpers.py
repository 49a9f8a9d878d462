"""Shared test helpers: the parity tolerance and NCHW<->NHWC conversion."""

import numpy as np

RTOL_SCALE = 1e-4  # max abs error <= 1e-4 * max(1, max|reference|)


def assert_parity(ours, ref, what: str = "output", tol: float = RTOL_SCALE) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref)))
    bound = tol * max(1.0, float(np.max(np.abs(ref))))
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e}"
    return err


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))
