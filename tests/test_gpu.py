"""GPU-only checks: the cuDNN attention path against the fp32 XLA path, at SD1.5's head
dimensions. Run with `JAX_PLATFORMS=cuda`; on a machine without a GPU (CI) they skip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freeanimate_jax.models.attention import Runtime, dot_product_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


# SD1.5 at 512x512: self-attention over 64x64 / 32x32 / 16x16 latents with 8 heads of width
# 40 / 80 / 160, and cross-attention to 77 text tokens; the motion module's 16-frame attention.
@pytest.mark.parametrize("lq,lk,width", [(4096, 4096, 320), (4096, 77, 320), (1024, 1024, 640),
                                         (256, 256, 1280), (256, 77, 1280), (16, 16, 320)])
def test_cudnn_attention_matches_fp32(lq, lk, width):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, lq, width), jnp.float32)
    k = jax.random.normal(kk, (2, lk, width), jnp.float32)
    v = jax.random.normal(kv, (2, lk, width), jnp.float32)
    xla, cudnn = Runtime(kernel="xla"), Runtime(kernel="cudnn")
    ref = np.asarray(jax.jit(lambda a, b, c: dot_product_attention(a, b, c, 8, runtime=xla))(
        q, k, v))
    bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    fn = jax.jit(lambda a, b, c: dot_product_attention(a, b, c, 8, runtime=cudnn))
    hlo = fn.lower(*bf).as_text()
    out = np.asarray(fn(*bf).astype(jnp.float32))
    assert "cudnn" in hlo, "cuDNN path not taken"
    # bf16 inputs carry 8 bits of mantissa: ~4e-3 relative per element, averaged over keys.
    assert np.abs(out - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())
