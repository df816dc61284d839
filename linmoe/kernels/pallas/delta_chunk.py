"""The delta rule's per-chunk kernels, all chunks in parallel: one program per (chunk, batch * head, block).

`local_value_grad` gives the intra-chunk part of dL/dDelta, scale (Q K^T * Gamma * causal)^T dO, that the
backward scan (`delta_scan.backward_scan`) completes with the state's part.
"""

import functools

import jax
import jax.numpy as jnp

from linmoe.kernels.pallas import _platform, _tile

_CHUNK, _FEATURE, _FIRST = (lambda i, j: i), (lambda i, j: j), (lambda i, j: 0)


def _local_value_grad_kernel(q_ref, k_ref, b_ref, do_ref, out_ref, *, scale: float, dtype: jnp.dtype) -> None:
  """Refs: q, k [C, K], b [C, 1] fp32, do [C, BV]; output [C, BV] fp32."""
  scores = _tile.scalar_decay_scores(q_ref[...], k_ref[...], b_ref[...], dtype)
  out_ref[...] = scale * _tile.dot(scores, do_ref[...], dtype, trans_a=True)


def local_value_grad(q: jax.Array, k: jax.Array, b: jax.Array, do: jax.Array, *, scale: float, chunk: int,
                     block_v: int) -> jax.Array:
  """scale (Q K^T * Gamma * causal)^T dO of every chunk.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    b: cumulative log decay within each chunk [batch, T, heads, 1] fp32.
    do: output cotangent [batch, T, heads, V].
    scale: output scale.
    chunk: C.
    block_v: value block of one program, dividing V.

  Returns:
    [batch, T, heads, V] fp32.
  """
  batch, seq, heads, key_dim = q.shape
  value_dim = do.shape[-1]
  call = _platform.pallas_call(
      functools.partial(_local_value_grad_kernel, scale=scale, dtype=q.dtype), name="linmoe_delta_dv_local",
      grid=(seq // chunk, batch * heads, value_dim // block_v),
      in_specs=[_tile.token_spec(heads, chunk, key_dim, _CHUNK, _FIRST)] * 2
      + [_tile.token_spec(heads, chunk, 1, _CHUNK, _FIRST),
         _tile.token_spec(heads, chunk, block_v, _CHUNK, _FEATURE)],
      out_specs=[_tile.token_spec(heads, chunk, block_v, _CHUNK, _FEATURE)],
      out_shape=[jax.ShapeDtypeStruct(do.shape, _tile.F32)])
  (d_local,) = call(q, k, b, do)
  return d_local
