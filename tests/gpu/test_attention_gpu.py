"""Softmax attention with segment ids on an NVIDIA GPU: `causal_attention` in bf16 (JAX's Pallas flash
kernel there) against XLA's masked attention in fp32 on the same bf16 values, outputs and gradients, on
packed rows. Tolerance, on max |actual - expected| / (1 + max |expected|): 2e-2.
Run: `python -m pytest -m gpu tests/gpu --noconftest`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.layers.attention import causal_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")]

BATCH, SEQ, HEADS, DIM = 2, 4000, 8, 128  # 4000: not a multiple of the kernel's block
TOL = 2e-2


def _masked(q, k, v, ids):
  same = ids[:, None, :, None] == ids[:, None, None, :]
  with jax.default_matmul_precision("highest"):
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True)


def test_packed_attention_matches_masked():
  dtype = jnp.bfloat16
  rng = np.random.default_rng(0)
  lengths = [np.diff(np.sort(np.concatenate([[0, SEQ], rng.choice(np.arange(1, SEQ), 7, replace=False)])))
             for _ in range(BATCH)]
  ids = jnp.asarray(np.stack([np.repeat(np.arange(len(l)), l) for l in lengths]), jnp.int32)
  q, k, v = jax.random.normal(jax.random.key(0), (3, BATCH, SEQ, HEADS, DIM))
  cotangent = jax.random.normal(jax.random.key(1), q.shape)
  low = [x.astype(dtype) for x in (q, k, v)]
  assert "pallas_call" in str(jax.make_jaxpr(lambda *a: causal_attention(*a, segment_ids=ids))(*low))
  got, vjp = jax.vjp(lambda *a: causal_attention(*a, segment_ids=ids), *low)
  want, vjp_ref = jax.vjp(lambda *a: _masked(*a, ids), *(x.astype(jnp.float32) for x in low))
  pairs = [(got, want)] + list(zip(vjp(cotangent.astype(dtype)), vjp_ref(cotangent)))
  for name, (a, b) in zip(["o", "dq", "dk", "dv"], pairs):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    err = np.max(np.abs(a - b)) / (1 + np.max(np.abs(b)))
    print(f"attention packed {np.dtype(dtype).name} {name}: {err:.2e}")
    assert err < TOL, (name, err)
