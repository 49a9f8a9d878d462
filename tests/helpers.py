"""Shared test helpers: the parity tolerance, NCHW<->NHWC conversion, a NumPy RA-SA, folder
listings, and a stand-in for FreeAnimate with instant, checkable output."""

from pathlib import Path

import numpy as np

from freeanimate_jax.pipelines.animate import AnimateResult

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


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class FakeAnimate:
    """FreeAnimate's interface with instant, checkable output."""

    made: list["FakeAnimate"] = []
    nan = False

    def __init__(self, models, settings, *, mesh=None, progress=None):
        self.models, self.settings, self.mesh, self.progress = models, settings, mesh, progress
        FakeAnimate.made.append(self)

    def __call__(self, reference, poses, prompt=""):
        self.seen = (reference, poses, prompt)
        if self.progress is not None:
            self.progress.stage("denoise", 2)
            self.progress("denoise", 0)
            self.progress("denoise", 1)
        frames = np.random.default_rng(0).random(poses.shape, dtype=np.float32)
        if FakeAnimate.nan:
            frames[1] = np.nan
        return AnimateResult(frames, frames.copy(), {"denoise": 0.01})


def lower_plan(pipeline, plan, specs, only: set[str] | None = None) -> dict[str, str]:
    """Lower every step of a pipeline's plan on its `input_specs` as the run calls it (each
    through `Stage.lower`, buffers placed by the pipeline's `placement`); returns each stage's
    compiled HLO text (of the stages in `only`, default all: the others are only lowered)."""
    import jax

    def place(tree, axis):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=pipeline.placement(a.shape, axis)), tree)

    live = {k: place(v, axis) for k, (v, axis) in specs.items()}
    texts = {}
    for step in plan:
        lowered = step.stage.lower(*(live[k] for k in step.inputs))
        out = lowered.out_info if len(step.outputs) > 1 else (lowered.out_info,)
        for (key, axis), tree in zip(step.outputs, out, strict=True):
            live[key] = place(tree, axis)
        if step.name not in texts and (only is None or step.name in only):
            texts[step.name] = lowered.compile().as_text()
    return texts


def process_env(devices: int, **extra: str) -> dict[str, str]:
    """A child process's environment: the CPU with `devices` virtual devices, no TPU variables
    (conftest sets them for libtpu; to a child they would mean "a TPU pod")."""
    import os

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}
    for key in ("TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY", "TPU_ACCELERATOR_TYPE"):
        env.pop(key, None)
    return env


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(hub: Path, repo: str) -> Path:
    """A repository's snapshot folder in a Hugging Face cache (`HF_HUB_CACHE`), laid out as
    huggingface_hub writes it (refs/main -> snapshots/<commit>/): files put there are what an
    offline `hf_hub_download` / `snapshot_download` of `repo` finds."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    snap = root / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def free_port() -> int:
    """A free localhost port for a jax.distributed coordinator."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]
