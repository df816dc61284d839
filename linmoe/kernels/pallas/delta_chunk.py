"""The delta rule's per-chunk kernels, all chunks in parallel: one program per (chunk, batch * head, block).

`wy_factors` forms, per chunk, L = strictly_lower(diag(beta) G) with G_ij = (k_i . k_j) e^{b_i - b_j}, the inverse
M = (I + L)^{-1} in fp32 by blocks (its SUB x SUB diagonal blocks by forward substitution, the others by
matmuls), and W = M (beta * K e^b), U = M (beta * V) (the WY factors of
`linmoe.kernels.delta_chunked`). `wy_grads` takes the cotangents dU = dDelta and dW = -dDelta S_n^T back to k, v,
beta and b:
  dV = beta * M^T dU,  d(K e^b) = beta * M^T dW,  dbeta = rowsum(M^T dU * V + M^T dW * K e^b) + rowsum(dL * G),
  dM = dU (beta V)^T + dW (beta K e^b)^T,  dL = strictly_lower(-M^T dM M^T),  dG = beta * dL,
  dK += (dG Gamma) K + (dG Gamma)^T K,  db += rowsum(dG * G) - colsum(dG * G) + rowsum(d(K e^b) * K e^b).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile
from linmoe.kernels.pallas import delta_segments as seg

_CHUNK, _FIRST = (lambda i, j: i), (lambda i, j: 0)
WY_NUM_WARPS = 8
SUB = 16  # Side of the diagonal blocks of I + L that the WY kernel inverts by substitution (divides every chunk).


def _strict_gram(k: jax.Array, b: jax.Array, pairs: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """G_ij = (k_i . k_j) e^{b_i - b_j} where pairs_ij, else 0, and the decays Gamma_ij = e^{b_i - b_j} (pairs_ij,
  else 0).

  Args: k [C, K], b [C, 1] fp32, pairs [C, C] bool (`_strict_pairs`); returns two [C, C] fp32.
  """
  decay = _tile.masked_exp(pairs, b - jnp.transpose(b))
  return _tile.dot(k, k, dtype, trans_b=True) * decay, decay


def _strict_pairs(chunk: int, doc: jax.Array | None) -> jax.Array:
  """[C, C] bool, j < i and (with the document index doc [C, 1]) i, j in one document: the entries of L."""
  return _tile.both(_tile.row_ids(chunk) > _tile.col_ids(chunk), _tile.same_document(doc, doc))


def _unit_lower_inverse(lower: jax.Array) -> jax.Array:
  """(I + lower)^{-1} of a strictly lower triangular [S, S] fp32 by forward substitution, one row at a time:
  row i of the inverse is e_i - sum_{j<i} lower_ij (row j of the inverse)."""
  size = lower.shape[0]
  rows, cols = _tile.row_ids(size), _tile.col_ids(size)
  lower_t = jnp.transpose(lower)

  def body(i, inverse):
    coefficients = jnp.sum(jnp.where(cols == i, lower_t, 0.0), axis=1, keepdims=True)  # [S, 1]: lower_ij
    update = jnp.sum(coefficients * inverse, axis=0, keepdims=True)  # [1, S]
    return inverse - jnp.where(rows == i, update, 0.0)

  return lax.fori_loop(1, size, body, (rows == cols).astype(_tile.F32))


def _sub_rows(a: int) -> pl.Slice:
  """Rows of the a-th SUB x SUB block of a chunk."""
  return pl.ds(a * SUB, SUB)


def _lower_block(k: list, b: list, beta: list, doc: list, a: int, c: int, dtype: jnp.dtype) -> jax.Array:
  """L_ac = diag(beta_a) (K_a K_c^T * Gamma_ac), the (a, c) block of L (c <= a; strictly lower when c = a),
  over the pairs of one document; the lists hold each block's rows of k [SUB, K], b, beta [SUB, 1] fp32 and
  the document index [SUB, 1] (or None)."""
  pairs = _tile.same_document(doc[a], doc[c])
  if a == c:
    pairs = _tile.both(_tile.row_ids(SUB) > _tile.col_ids(SUB), pairs)
  exponent = b[a] - jnp.transpose(b[c])
  decay = jnp.exp(exponent) if pairs is None else _tile.masked_exp(pairs, exponent)
  return beta[a] * _tile.dot(k[a], k[c], dtype, trans_b=True) * decay


def _block_inverse(k: list, b: list, beta: list, doc: list, dtype: jnp.dtype) -> dict:
  """The blocks M_ac (c <= a) of M = (I + L)^{-1}: the diagonal ones by substitution, then block row by block
  row M_ac = -M_aa sum_{c <= e < a} L_ae M_ec (matmuls in fp32)."""
  inverse = {}
  for a in range(len(k)):
    inverse[a, a] = _unit_lower_inverse(_lower_block(k, b, beta, doc, a, a, dtype))
    lower = {e: _lower_block(k, b, beta, doc, a, e, dtype) for e in range(a)}
    for c in range(a):
      total = sum(_tile.dot(lower[e], inverse[e, c], _tile.F32) for e in range(c, a))
      inverse[a, c] = -_tile.dot(inverse[a, a], total, _tile.F32)
  return inverse


def _wy_kernel(k_ref, v_ref, beta_ref, b_ref, *refs, dtype: jnp.dtype, segmented: bool) -> None:
  """Refs: k [C, K], v [C, V], beta [C, 1], b [C, 1] fp32, (segmented) the document index [C, 1] int32;
  outputs W [C, K] (zero in the rows that do not read the incoming state), U [C, V], M [C, C] fp32.
  Works on blocks of SUB rows (`_block_inverse`)."""
  doc_ref, (w_ref, u_ref, m_ref) = seg.split_refs(refs, segmented)
  blocks = range(k_ref.shape[0] // SUB)
  k = [k_ref[_sub_rows(a), :] for a in blocks]
  b = [b_ref[_sub_rows(a), :] for a in blocks]
  beta = [beta_ref[_sub_rows(a), :].astype(_tile.F32) for a in blocks]
  doc = [None if doc_ref is None else doc_ref[_sub_rows(a), :] for a in blocks]
  inverse = _block_inverse(k, b, beta, doc, dtype)
  keys = [beta[a] * k[a].astype(_tile.F32) * jnp.exp(b[a]) for a in blocks]
  values = [beta[a] * v_ref[_sub_rows(a), :].astype(_tile.F32) for a in blocks]
  for a in blocks:
    w = sum(_tile.dot(inverse[a, c], keys[c], dtype) for c in range(a + 1))
    w_ref[_sub_rows(a), :] = seg.keep(seg.reads_prev(doc[a]), w).astype(w_ref.dtype)
    u = sum(_tile.dot(inverse[a, c], values[c], dtype) for c in range(a + 1))
    u_ref[_sub_rows(a), :] = u.astype(u_ref.dtype)
    for c in blocks:
      m_ref[_sub_rows(a), _sub_rows(c)] = inverse[a, c] if c <= a else jnp.zeros((SUB, SUB), _tile.F32)


def _wy_grads_kernel(k_ref, v_ref, beta_ref, b_ref, m_ref, dd_ref, s_ref, *refs, dtype: jnp.dtype,
                     segmented: bool) -> None:
  """Refs: k [C, K], v [C, V], beta [C, 1], b [C, 1] fp32, M [C, C] fp32, dDelta [C, V] fp32, S_n [K, V],
  (segmented) the document index [C, 1] int32; outputs dk [C, K] fp32 (the WY part), dv [C, V], dbeta [C, 1]
  fp32, db [C, 1] fp32 (the WY part)."""
  doc_ref, (dk_ref, dv_ref, dbeta_ref, db_ref) = seg.split_refs(refs, segmented)
  doc = None if doc_ref is None else doc_ref[...]
  k, v, b, m = k_ref[...].astype(_tile.F32), v_ref[...].astype(_tile.F32), b_ref[...], m_ref[...]
  beta, d_u = beta_ref[...].astype(_tile.F32), dd_ref[...]
  d_w = seg.keep(seg.reads_prev(doc), -_tile.dot(d_u, s_ref[...], dtype, trans_b=True))  # [C, K]
  k_decayed = k * jnp.exp(b)
  mt_du = _tile.dot(m, d_u, dtype, trans_a=True)
  mt_dw = _tile.dot(m, d_w, dtype, trans_a=True)
  d_m = _tile.dot(d_u, beta * v, dtype, trans_b=True) + _tile.dot(d_w, beta * k_decayed, dtype, trans_b=True)
  d_lower = -_tile.dot(_tile.dot(m, d_m, dtype, trans_a=True), m, dtype, trans_b=True)
  pairs = _strict_pairs(k.shape[0], doc)
  gram, decay = _strict_gram(k_ref[...], b, pairs, dtype)
  d_lower = jnp.where(pairs, d_lower, 0.0)
  d_gram = beta * d_lower
  dk_decayed = beta * mt_dw
  d_scores = d_gram * decay
  dk = (_tile.dot(d_scores, k, dtype) + _tile.dot(d_scores, k, dtype, trans_a=True)
        + dk_decayed * jnp.exp(b))
  d_pairs = d_gram * gram
  db = (jnp.sum(d_pairs, axis=1, keepdims=True) - jnp.transpose(jnp.sum(d_pairs, axis=0, keepdims=True))
        + jnp.sum(dk_decayed * k_decayed, axis=1, keepdims=True))
  dbeta_ref[...] = (jnp.sum(mt_du * v, axis=1, keepdims=True) + jnp.sum(mt_dw * k_decayed, axis=1, keepdims=True)
                    + jnp.sum(d_lower * gram, axis=1, keepdims=True))
  dk_ref[...] = dk
  dv_ref[...] = (beta * mt_du).astype(dv_ref.dtype)
  db_ref[...] = db


def wy_factors(k: jax.Array, v: jax.Array, beta: jax.Array, b: jax.Array, doc: jax.Array | None, *,
               chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """W, U and M = (I + L)^{-1} of every chunk (module docstring).

  Args:
    k: keys [batch, T, heads, K], T a multiple of chunk.
    v: values [batch, T, heads, V].
    beta: write strength [batch, T, heads, 1].
    b: cumulative log decay within each chunk [batch, T, heads, 1] fp32.
    doc: document index [batch, T, 1] int32 (`delta_segments`) or None.
    chunk: C.

  Returns:
    W [batch, T, heads, K] in k's dtype (zero in the rows that do not read the incoming state), U [batch, T,
    heads, V] in v's dtype, M [batch, T, heads, C] fp32 (row i of chunk n's M at token n C + i).
  """
  batch, seq, heads, key_dim = k.shape
  value_dim = v.shape[-1]
  call = _platform.pallas_call(
      functools.partial(_wy_kernel, dtype=k.dtype, segmented=doc is not None), name="linmoe_delta_wy",
      grid=(seq // chunk, batch * heads, 1), num_warps=WY_NUM_WARPS,
      in_specs=[_tile.token_spec(heads, chunk, x.shape[-1], _CHUNK, _FIRST) for x in (k, v, beta, b)]
      + [_tile.document_spec(heads, chunk, _CHUNK)] * (doc is not None),
      out_specs=[_tile.token_spec(heads, chunk, width, _CHUNK, _FIRST) for width in (key_dim, value_dim, chunk)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((batch, seq, heads, chunk), _tile.F32)])
  w, u, m = call(*seg.with_doc((k, v, beta, b), doc))
  return w, u, m


def wy_grads(k: jax.Array, v: jax.Array, beta: jax.Array, b: jax.Array, m: jax.Array, d_delta: jax.Array,
             states: jax.Array, doc: jax.Array | None, *,
             chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The WY factors' part of the gradients, from dU = dDelta and dW = -dDelta S_n^T (module docstring).

  Args:
    k, v, beta, b, doc: as `wy_factors`.
    m: M of `wy_factors` [batch, T, heads, C] fp32.
    d_delta: dL/dDelta [batch, T, heads, V] fp32.
    states: S_n, the state entering each chunk [batch, T / C, heads, K, V] (the inputs' dtype or fp32).
    chunk: C.

  Returns:
    dk [batch, T, heads, K] fp32 (WY part), dv [batch, T, heads, V] in v's dtype, dbeta [batch, T, heads, 1]
    fp32, db [batch, T, heads, 1] fp32 (WY part).
  """
  batch, seq, heads, key_dim = k.shape
  value_dim = v.shape[-1]
  token = lambda width: _tile.token_spec(heads, chunk, width, _CHUNK, _FIRST)  # noqa: E731
  call = _platform.pallas_call(
      functools.partial(_wy_grads_kernel, dtype=k.dtype, segmented=doc is not None), name="linmoe_delta_wy_grads",
      grid=(seq // chunk, batch * heads, 1), num_warps=WY_NUM_WARPS,
      in_specs=[token(key_dim), token(value_dim), token(1), token(1), token(chunk), token(value_dim),
                _tile.chunk_state_spec(heads, None, key_dim, value_dim, _CHUNK, _FIRST, _FIRST)]
      + [_tile.document_spec(heads, chunk, _CHUNK)] * (doc is not None),
      out_specs=[token(key_dim), token(value_dim), token(1), token(1)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, _tile.F32), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(b.shape, _tile.F32), jax.ShapeDtypeStruct(b.shape, _tile.F32)])
  dk, dv, dbeta, db = call(*seg.with_doc((k, v, beta, b, m, d_delta, states), doc))
  return dk, dv, dbeta, db

