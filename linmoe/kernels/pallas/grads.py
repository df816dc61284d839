"""Backward per-chunk kernels, all chunks in parallel, from the chunk-entry states h_n and their gradients.

With dE = dL/dh_{n+1} (the gradient of the state leaving chunk n), B = b_C, dA_ij = scale do_i . v_j (j <= i):
  dv_j = scale sum_{i>=j} A_ij do_i + (k_j * e^{B - b_j}) dE
  dq_i = scale e^{b_i} * (h_n do_i) + sum_{j<=i} dA_ij k_j e^{b_i - b_j}
  dk_j = e^{B - b_j} * (dE v_j)    + sum_{i>=j} dA_ij q_i e^{b_i - b_j}
  db_i = q_i * dq_i - k_i * dk_i,
  plus at the chunk's last row dL/dB = e^B * rowsum(h_n * dE) + sum_j k_j * dk_j^state
(db is the gradient of the cumulative log decay; the caller's autodiff maps it back to g). Scalar decay does
the intra sums here; vector decay leaves them to `intra.intra_grads`. With segment ids the same masks as in the
forward pass: A and dA pair tokens of one document, h_n reaches the rows of the chunk's first document (in dq),
dE those of its last one (in dv, dk), and e^B h_n is kept (dL/dB's first term) only in a chunk with no boundary.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile


def _documents(d_ref) -> tuple[jax.Array | None, jax.Array | None]:
  """The documents of a chunk [C, 1] and of its last row [1, 1] (None, None without segment ids)."""
  if d_ref is None:
    return None, None
  return d_ref[...], d_ref[pl.ds(d_ref.shape[0] - 1, 1), :]


def _decay_from(exponent: jax.Array, d: jax.Array | None, d_from: jax.Array | int) -> jax.Array:
  """e^exponent [C, Kg], masked to the rows of document d_from ([1, 1], or 0: the first) with segment ids."""
  return jnp.exp(exponent) if d is None else _tile.masked_exp(d == d_from, exponent)


def _dv_kernel(d_ref, k_ref, b_ref, do_ref, dh_ref, s_ref, dv_ref, *, scale: float, vector_decay: bool,
               dtype: jnp.dtype) -> None:
  """dv of one chunk and value block.

  Refs: d [C, 1] int32 documents or None, k [C, K], b [C, Kg] fp32, do [C, BV], dh [K, BV] (dE), s: q
  [C, K] (scalar decay) or the scores A [C, C] fp32 (vector decay); output dv [C, BV].
  """
  k, b = k_ref[...], b_ref[...]
  d, d_end = _documents(d_ref)
  b_end = b_ref[pl.ds(b.shape[0] - 1, 1), :]
  if vector_decay:
    scores = s_ref[...]
  else:
    scores = _tile.scalar_decay_scores(s_ref[...], k, b, dtype, _tile.same_document(d, d))
  dv = scale * _tile.dot(scores, do_ref[...], dtype, trans_a=True)
  dv += _tile.dot(k.astype(_tile.F32) * _decay_from(b_end - b, d, d_end), dh_ref[...], dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqk_kernel(d_ref, q_ref, k_ref, v_ref, do_ref, b_ref, h_ref, dh_ref, dq_ref, dk_ref, db_ref, *,
                scale: float, vector_decay: bool, dtype: jnp.dtype) -> None:
  """dq, dk and db of one chunk and key block (without the intra sums for vector decay).

  Refs: d [C, 1] int32 documents or None, q, k [C, BK], v, do [C, V], b [C, Kg] fp32 (Kg 1 or BK), h, dh
  [BK, V] (h_n, dE); outputs dq, dk [C, BK] and db [C, Kg] (for scalar decay, this key block's share).
  """
  chunk = q_ref.shape[0]
  q, k, v, do = q_ref[...].astype(_tile.F32), k_ref[...].astype(_tile.F32), v_ref[...], do_ref[...]
  h, dh, b = h_ref[...].astype(_tile.F32), dh_ref[...].astype(_tile.F32), b_ref[...]
  decay_dim = b.shape[-1]
  d, doc_end = _documents(d_ref)
  b_end = b_ref[pl.ds(chunk - 1, 1), :]
  dq = (scale * _decay_from(b, d, 0)) * _tile.dot(do, h, dtype, trans_b=True)
  dk = _decay_from(b_end - b, d, doc_end) * _tile.dot(v, dh, dtype, trans_b=True)
  carry = jnp.exp(b_end) if d is None else jnp.where(doc_end == 0, jnp.exp(b_end), 0.0)
  d_end = (carry * _tile.sum_to_decay(jnp.sum(h * dh, axis=1)[None, :], decay_dim)
           + _tile.sum_to_decay(jnp.sum(k * dk, axis=0, keepdims=True), decay_dim))
  if not vector_decay:
    d_scores = scale * _tile.dot(do, v, dtype, trans_b=True)
    d_scores *= _tile.masked_exp(_tile.both(_tile.causal(chunk), _tile.same_document(d, d)),
                                 b - jnp.transpose(b))
    dq += _tile.dot(d_scores, k, dtype)
    dk += _tile.dot(d_scores, q, dtype, trans_a=True)
  db = _tile.sum_to_decay(q * dq - k * dk, decay_dim)
  db_ref[...] = db + jnp.where(_tile.row_ids(chunk) == chunk - 1, d_end, 0.0)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)


def _d_scores_kernel(d_ref, do_ref, v_ref, ds_ref, *, scale: float, dtype: jnp.dtype) -> None:
  """dL/dA = scale * do v^T of one chunk, zero above the diagonal and (segment ids) between documents.

  Refs: d [C, 1] int32 documents or None, do, v [C, V]; output [C, C] fp32.
  """
  chunk = do_ref.shape[0]
  d = None if d_ref is None else d_ref[...]
  d_scores = scale * _tile.dot(do_ref[...], v_ref[...], dtype, trans_b=True)
  ds_ref[...] = jnp.where(_tile.both(_tile.causal(chunk), _tile.same_document(d, d)), d_scores, 0.0)


_CHUNK, _FEATURE, _FIRST = (lambda i, j: i), (lambda i, j: j), (lambda i, j: 0)


def value_grad(q: jax.Array, k: jax.Array, b: jax.Array, do: jax.Array, d_states: jax.Array,
               scores: jax.Array | None, *, scale: float, chunk: int, block_v: int, dtype: jnp.dtype,
               docs: jax.Array | None = None) -> jax.Array:
  """dv of every chunk.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    b: cumulative log decay within each chunk [batch, T, heads, Kg] fp32.
    do: output cotangent [batch, T, heads, V].
    d_states: dL/dh_{n+1} for each chunk n [batch, T / C, heads, K, V] (`state.chunk_scan`'s dtype).
    scores: causal scores [batch, T, heads, C] fp32 (vector decay), or None (scalar decay).
    scale: output scale.
    chunk: C.
    block_v: value block of one program, dividing V.
    dtype: dtype of dv (v's).
    docs: optional documents [batch, T, 1] int32 (segments.chunk_documents).

  Returns:
    dv [batch, T, heads, V].
  """
  batch, seq, heads, key_dim = q.shape
  value_dim, decay_dim = do.shape[-1], b.shape[-1]
  vector_decay = scores is not None
  score_source = scores if vector_decay else q
  kernel, doc_specs, doc_args = _tile.with_documents(
      functools.partial(_dv_kernel, scale=scale, vector_decay=vector_decay, dtype=q.dtype), docs,
      _tile.document_spec(heads, chunk, _CHUNK))
  call = _platform.pallas_call(
      kernel, name="linmoe_chunk_dv", grid=(seq // chunk, batch * heads, value_dim // block_v),
      in_specs=[
          *doc_specs,
          _tile.token_spec(heads, chunk, key_dim, _CHUNK, _FIRST),
          _tile.token_spec(heads, chunk, decay_dim, _CHUNK, _FIRST),
          _tile.token_spec(heads, chunk, block_v, _CHUNK, _FEATURE),
          _tile.chunk_state_spec(heads, None, key_dim, block_v, _CHUNK, _FIRST, _FEATURE),
          _tile.token_spec(heads, chunk, score_source.shape[-1], _CHUNK, _FIRST),
      ],
      out_specs=[_tile.token_spec(heads, chunk, block_v, _CHUNK, _FEATURE)],
      out_shape=[jax.ShapeDtypeStruct(do.shape[:-1] + (value_dim,), dtype)])
  (dv,) = call(*doc_args, k, b, do, d_states, score_source)
  return dv


def query_key_grads(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, b: jax.Array, states: jax.Array,
                    d_states: jax.Array, *, scale: float, chunk: int, block_k: int,
                    docs: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dq, dk and db of every chunk; for vector decay only their inter-chunk parts.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    v, do: values and output cotangent [batch, T, heads, V].
    b: cumulative log decay within each chunk [batch, T, heads, Kg] fp32, Kg in {1, K}.
    states: h_n [batch, T / C, heads, K, V] (`state.chunk_scan`'s dtype).
    d_states: dL/dh_{n+1} [batch, T / C, heads, K, V] (`state.chunk_scan`'s dtype).
    scale: output scale.
    chunk: C.
    block_k: key block of one program, dividing K.
    docs: optional documents [batch, T, 1] int32 (segments.chunk_documents).

  Returns:
    Scalar decay: dq, dk [batch, T, heads, K] in q's dtype and db [batch, T, heads, 1] fp32. Vector decay:
    the inter-chunk parts of dq, dk and db, all [batch, T, heads, K] fp32.
  """
  batch, seq, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  vector_decay = b.shape[-1] > 1
  n_key_blocks = key_dim // block_k
  decay_block = block_k if vector_decay else 1
  grad_dtype = _tile.F32 if vector_decay else q.dtype
  kernel, doc_specs, doc_args = _tile.with_documents(
      functools.partial(_dqk_kernel, scale=scale, vector_decay=vector_decay, dtype=q.dtype), docs,
      _tile.document_spec(heads, chunk, _CHUNK))
  call = _platform.pallas_call(
      kernel, name="linmoe_chunk_dqk", grid=(seq // chunk, batch * heads, n_key_blocks),
      in_specs=[
          *doc_specs,
          _tile.token_spec(heads, chunk, block_k, _CHUNK, _FEATURE),
          _tile.token_spec(heads, chunk, block_k, _CHUNK, _FEATURE),
          _tile.token_spec(heads, chunk, value_dim, _CHUNK, _FIRST),
          _tile.token_spec(heads, chunk, value_dim, _CHUNK, _FIRST),
          _tile.token_spec(heads, chunk, decay_block, _CHUNK, _FEATURE if vector_decay else _FIRST),
          _tile.chunk_state_spec(heads, None, block_k, value_dim, _CHUNK, _FEATURE, _FIRST),
          _tile.chunk_state_spec(heads, None, block_k, value_dim, _CHUNK, _FEATURE, _FIRST),
      ],
      out_specs=[
          _tile.token_spec(heads, chunk, block_k, _CHUNK, _FEATURE),
          _tile.token_spec(heads, chunk, block_k, _CHUNK, _FEATURE),
          _tile.token_spec(heads, chunk, decay_block, _CHUNK, _FEATURE),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, grad_dtype),
          jax.ShapeDtypeStruct(q.shape, grad_dtype),
          jax.ShapeDtypeStruct((batch, seq, heads, key_dim if vector_decay else n_key_blocks), _tile.F32),
      ])
  dq, dk, db = call(*doc_args, q, k, v, do, b, states, d_states)
  return dq, dk, db if vector_decay else jnp.sum(db, axis=-1, keepdims=True)


def score_grads(do: jax.Array, v: jax.Array, *, scale: float, chunk: int,
                docs: jax.Array | None = None) -> jax.Array:
  """dL/dA of vector decay's intra scores: [batch, T, heads, C] fp32 from do, v [batch, T, heads, V] (and the
  optional documents [batch, T, 1] int32 of segments.chunk_documents)."""
  batch, seq, heads, value_dim = v.shape
  kernel, doc_specs, doc_args = _tile.with_documents(
      functools.partial(_d_scores_kernel, scale=scale, dtype=v.dtype), docs,
      _tile.document_spec(heads, chunk, _CHUNK))
  call = _platform.pallas_call(
      kernel, name="linmoe_gla_d_scores", grid=(seq // chunk, batch * heads, 1),
      in_specs=[*doc_specs, *[_tile.token_spec(heads, chunk, value_dim, _CHUNK, _FIRST)] * 2],
      out_specs=[_tile.token_spec(heads, chunk, chunk, _CHUNK, _FIRST)],
      out_shape=[jax.ShapeDtypeStruct((batch, seq, heads, chunk), _tile.F32)])
  (d_scores,) = call(*doc_args, do, v)
  return d_scores
