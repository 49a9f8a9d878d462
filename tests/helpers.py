"""Shared test helpers: the parity tolerance, NCHW<->NHWC conversion, a NumPy RA-SA."""

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


def np_anchored_attention(layer, x, anchor, heads: int):
    """softmax([q] [k; k_ref]^T / sqrt(d)) [v; v_ref], written out in NumPy (float64)."""
    w = {n: np.asarray(getattr(layer, n).weight[...], np.float64) for n in ("to_q", "to_k", "to_v")}
    wo = np.asarray(layer.to_out[0].weight[...], np.float64)
    bo = np.asarray(layer.to_out[0].bias[...], np.float64)
    x, anchor = np.asarray(x, np.float64), np.asarray(anchor, np.float64)
    outs = []
    for b in range(x.shape[0]):
        kv_in = np.concatenate([x[b], anchor[0]], axis=0)
        q, k, v = x[b] @ w["to_q"], kv_in @ w["to_k"], kv_in @ w["to_v"]
        d = q.shape[-1] // heads
        head_outs = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            logits = q[:, sl] @ k[:, sl].T / np.sqrt(d)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            head_outs.append((p / p.sum(-1, keepdims=True)) @ v[:, sl])
        outs.append(np.concatenate(head_outs, -1) @ wo + bo)
    return np.stack(outs)
