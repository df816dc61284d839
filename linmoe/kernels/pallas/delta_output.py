"""The delta rule's outputs and their query / key gradients, all chunks in parallel, with document boundaries.

Given the corrected values Delta and the chunk-entry states S_n, the outputs are those of the scalar-decay
recurrence on Delta (as `output.chunk_outputs` and `grads.query_key_grads` compute them), with the masks of
`delta_segments` when the row packs documents:
  o_i  = scale [r_i (q_i e^{b_i})^T S_n + sum_{j<=i, same document} (q_i . k_j) e^{b_i - b_j} Delta_j],
  dq_i = scale r_i e^{b_i} (S_n dO_i) + sum_j dA_ij k_j,   dk_j = l_j e^{B - b_j} (dS Delta_j) + sum_i dA_ij q_i,
  db_i = q_i . dq_i - k_i . dk_i, plus at the chunk's last row c e^B <S_n, dS> + sum_j k_j . dk_j^state,
with dA_ij = scale (dO_i . Delta_j) e^{b_i - b_j} over the same pairs, dS = dL/dS_{n+1}, r the rows that read S_n,
l the keys of the chunk's last document, c = 1 iff S_n passes through the chunk (all 1 without boundaries).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile
from linmoe.kernels.pallas import delta_segments as seg

_CHUNK, _FEATURE, _FIRST = (lambda i, j: i), (lambda i, j: j), (lambda i, j: 0)


def _scores(q: jax.Array, k: jax.Array, b: jax.Array, doc: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
  """Causal scores (q_i . k_j) e^{b_i - b_j} of the pairs of one document, [C, C] fp32."""
  return _tile.scalar_decay_scores(q, k, b, dtype, same=_tile.same_document(doc, doc))


def _total(x: jax.Array) -> jax.Array:
  """The sum of a [R, C] tile as [1, 1] (one axis at a time)."""
  return jnp.sum(jnp.sum(x, axis=0, keepdims=True), axis=1, keepdims=True)


def _output_kernel(q_ref, k_ref, d_ref, b_ref, h_ref, *refs, scale: float, dtype: jnp.dtype,
                   segmented: bool) -> None:
  """Refs: q, k [C, K], Delta [C, BV], b [C, 1] fp32, S_n [K, BV], (segmented) the document index [C, 1]
  int32; output o [C, BV]."""
  doc_ref, (o_ref,) = seg.split_refs(refs, segmented)
  doc = None if doc_ref is None else doc_ref[...]
  q, b = q_ref[...], b_ref[...]
  inter = _tile.dot(seg.keep(seg.reads_prev(doc), q.astype(_tile.F32) * jnp.exp(b)), h_ref[...], dtype)
  intra = _tile.dot(_scores(q, k_ref[...], b, doc, dtype), d_ref[...], dtype)
  o_ref[...] = (scale * (inter + intra)).astype(o_ref.dtype)


def _dqk_kernel(q_ref, k_ref, d_ref, do_ref, b_ref, h_ref, dh_ref, *refs, scale: float, dtype: jnp.dtype,
                segmented: bool) -> None:
  """Refs: q, k [C, BK], Delta, dO [C, V], b [C, 1] fp32, S_n, dS [BK, V] (the inputs' dtype), (segmented) the
  document index [C, 1] int32; outputs dq, dk [C, BK] and this key block's share of db [C, 1] fp32."""
  doc_ref, (dq_ref, dk_ref, db_ref) = seg.split_refs(refs, segmented)
  chunk = q_ref.shape[0]
  doc = doc_end = None
  if doc_ref is not None:
    doc, doc_end = doc_ref[...], doc_ref[pl.ds(chunk - 1, 1), :]
  q, k, delta, do = q_ref[...].astype(_tile.F32), k_ref[...].astype(_tile.F32), d_ref[...], do_ref[...]
  h, dh, b = h_ref[...].astype(_tile.F32), dh_ref[...].astype(_tile.F32), b_ref[...]
  b_end = b_ref[pl.ds(chunk - 1, 1), :]
  dq = seg.keep(seg.reads_prev(doc), (scale * jnp.exp(b)) * _tile.dot(do, h, dtype, trans_b=True))
  dk = seg.keep(seg.in_last(doc, doc_end), jnp.exp(b_end - b)) * _tile.dot(delta, dh, dtype, trans_b=True)
  d_end = seg.keep(seg.carries(doc_end), jnp.exp(b_end)) * _total(h * dh) + _total(k * dk)
  d_scores = scale * _tile.dot(do, delta, dtype, trans_b=True)
  pairs = _tile.both(_tile.causal(chunk), _tile.same_document(doc, doc))
  d_scores *= _tile.masked_exp(pairs, b - jnp.transpose(b))
  dq += _tile.dot(d_scores, k, dtype)
  dk += _tile.dot(d_scores, q, dtype, trans_a=True)
  db = jnp.sum(q * dq - k * dk, axis=1, keepdims=True)
  db_ref[...] = db + jnp.where(_tile.row_ids(chunk) == chunk - 1, d_end, 0.0)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)


def chunk_outputs(q: jax.Array, k: jax.Array, delta: jax.Array, b: jax.Array, states: jax.Array,
                  doc: jax.Array | None, *, scale: float, chunk: int, block_v: int) -> jax.Array:
  """Outputs of every chunk from the corrected values and the chunk-entry states.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    delta: corrected values Delta [batch, T, heads, V].
    b: cumulative log decay within each chunk [batch, T, heads, 1] fp32.
    states: S_n, the state entering each chunk [batch, T / C, heads, K, V] (the inputs' dtype or fp32).
    doc: document index [batch, T, 1] int32 (`delta_segments`) or None.
    scale: output scale.
    chunk: C.
    block_v: value block of one program, dividing V.

  Returns:
    o [batch, T, heads, V] in Delta's dtype.
  """
  batch, seq, heads, key_dim = q.shape
  value_dim = delta.shape[-1]
  token = lambda width, col=_FIRST: _tile.token_spec(heads, chunk, width, _CHUNK, col)  # noqa: E731
  call = _platform.pallas_call(
      functools.partial(_output_kernel, scale=scale, dtype=delta.dtype, segmented=doc is not None),
      name="linmoe_delta_outputs", grid=(seq // chunk, batch * heads, value_dim // block_v),
      in_specs=[token(key_dim), token(key_dim), token(block_v, _FEATURE), token(1),
                _tile.chunk_state_spec(heads, None, key_dim, block_v, _CHUNK, _FIRST, _FEATURE)]
      + [_tile.document_spec(heads, chunk, _CHUNK)] * (doc is not None),
      out_specs=[token(block_v, _FEATURE)],
      out_shape=[jax.ShapeDtypeStruct(delta.shape, delta.dtype)])
  (o,) = call(*seg.with_doc((q, k, delta, b, states), doc))
  return o


def query_key_grads(q: jax.Array, k: jax.Array, delta: jax.Array, do: jax.Array, b: jax.Array,
                    states: jax.Array, d_states: jax.Array, doc: jax.Array | None, *, scale: float, chunk: int,
                    block_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The parts of dq, dk and db that treat Delta as given (module docstring), every chunk.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    delta, do: corrected values and output cotangent [batch, T, heads, V].
    b: cumulative log decay within each chunk [batch, T, heads, 1] fp32.
    states: S_n [batch, T / C, heads, K, V] (the inputs' dtype or fp32).
    d_states: dL/dS_{n+1} [batch, T / C, heads, K, V], likewise.
    doc: as `chunk_outputs`.
    scale: output scale.
    chunk: C.
    block_k: key block of one program, dividing K.

  Returns:
    dq, dk [batch, T, heads, K] in q's dtype and db [batch, T, heads, 1] fp32.
  """
  batch, seq, heads, key_dim = q.shape
  value_dim = delta.shape[-1]
  n_key_blocks = key_dim // block_k
  token = lambda width, col=_FIRST: _tile.token_spec(heads, chunk, width, _CHUNK, col)  # noqa: E731
  state = _tile.chunk_state_spec(heads, None, block_k, value_dim, _CHUNK, _FEATURE, _FIRST)
  call = _platform.pallas_call(
      functools.partial(_dqk_kernel, scale=scale, dtype=q.dtype, segmented=doc is not None),
      name="linmoe_delta_dqk", grid=(seq // chunk, batch * heads, n_key_blocks),
      in_specs=[token(block_k, _FEATURE), token(block_k, _FEATURE), token(value_dim), token(value_dim), token(1),
                state, state] + [_tile.document_spec(heads, chunk, _CHUNK)] * (doc is not None),
      out_specs=[token(block_k, _FEATURE), token(block_k, _FEATURE), token(1, _FEATURE)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, seq, heads, n_key_blocks), _tile.F32)])
  dq, dk, db = call(*seg.with_doc((q, k, delta, do, b, states, d_states), doc))
  return dq, dk, jnp.sum(db, axis=-1, keepdims=True)
