"""Vector-decay (GLA) intra-chunk terms by sub-chunks: one program per (sub-chunk, batch * head).

A pair (i, j) in different sub-chunks factors as e^{b_i - b_j} = e^{b_i - b_r} e^{b_r - b_j} around a reference
row r between them (the first row of i's sub-chunk for the scores and dq, the last row of j's sub-chunk for dk):
both exponents are <= 0 and a matmul does the sum over key channels. A pair inside one sub-chunk factors the
same way around the sub-chunk's first (last) row when the sub-chunk's decay span is at most FACTORED_SPAN on
every key channel: then one factor is >= 1 but at most e^FACTORED_SPAN, far from overflow, and the same matmul
covers the diagonal block. A sub-chunk with a stronger decay (hostile gates, a saturated softplus) takes its
[c, K] decays directly instead, one column (or row) per loop step. Every exponent is masked before exp.
With segment ids the scores of pairs in different documents are 0; so is their dL/dA (`grads.score_grads`), which
keeps those pairs out of the gradients too.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile


# Largest decay span b_first - b_last (on any key channel) of a sub-chunk whose diagonal block is factored like
# the off-diagonal ones: its factors stay within e^{+-40} (~1e17), so bf16 and fp32 products of inputs up to
# ~1e8 cannot overflow, and every factored term keeps its relative precision (no cancellation across factors).
FACTORED_SPAN = 40.0


def _sub_chunk_start(chunk: int, sub: int) -> jax.Array:
  """First row, within its chunk, of the sub-chunk of this program."""
  return pl.multiple_of((pl.program_id(0) % (chunk // sub)) * sub, sub)


def _diagonal_rows(b_ref, start: jax.Array, sub: int) -> jax.Array:
  """Rows of the diagonal block that the matmul covers: sub when the sub-chunk's decay span is at most
  FACTORED_SPAN on every key channel (b is non-increasing within the chunk), else 0 (the pair loop takes them)."""
  span = b_ref[pl.ds(start, 1), :] - b_ref[pl.ds(start + sub - 1, 1), :]
  return sub * (jnp.max(span) <= FACTORED_SPAN).astype(jnp.int32)


def _scores_kernel(d_ref, q_ref, k_ref, b_ref, a_ref, *, sub: int, dtype: jnp.dtype) -> None:
  """Scores A_ij = sum_d q_id k_jd e^{b_id - b_jd} (j <= i, same document) of the rows of one sub-chunk.

  Refs: d: the chunk's documents [C, 1] int32 or None; q, k, b: the chunk [C, K] (b fp32); output a: the
  sub-chunk's rows [c, C] fp32.
  """
  chunk = k_ref.shape[0]
  start = _sub_chunk_start(chunk, sub)
  rows = pl.ds(start, sub)
  q, b = q_ref[rows, :].astype(_tile.F32), b_ref[rows, :]
  b_first = b_ref[pl.ds(start, 1), :]
  factored = _diagonal_rows(b_ref, start, sub)
  covered = _tile.row_ids(chunk) < start + factored
  k_to_first = k_ref[...].astype(_tile.F32) * _tile.masked_exp(covered, b_first - b_ref[...])
  cols, local = _tile.col_ids(chunk), _tile.row_ids(sub)
  scores = jnp.where(cols <= start + local,
                     _tile.dot(q * jnp.exp(b - b_first), k_to_first, dtype, trans_b=True), 0.0)

  def diagonal(t, scores):
    col = pl.ds(start + t, 1)
    pair = q * k_ref[col, :].astype(_tile.F32) * _tile.masked_exp(local >= t, b - b_ref[col, :])
    return scores + jnp.where(cols == start + t, jnp.sum(pair, axis=1, keepdims=True), 0.0)

  scores = lax.fori_loop(0, sub - factored, diagonal, scores)
  if d_ref is not None:
    scores = jnp.where(_tile.same_document(d_ref[rows, :], d_ref[...]), scores, 0.0)
  a_ref[...] = scores


def _grads_kernel(q_ref, k_ref, b_ref, da_ref, dq_ref, dk_ref, db_ref, dq_out, dk_out, db_out, *, sub: int,
                  dtype: jnp.dtype) -> None:
  """Adds the intra-chunk parts of dq, dk and db to the inter-chunk ones, for the rows of one sub-chunk.

  dq_i += sum_{j<=i} dA_ij k_j e^{b_i - b_j};  dk_j += sum_{i>=j} dA_ij q_i e^{b_i - b_j};  db += q dq - k dk
  (intra parts only). Refs: q, k, b: the chunk [C, K] (b fp32); da: dL/dA of the chunk [C, C] fp32 (zero above
  the diagonal); dq, dk, db: inter-chunk parts of the sub-chunk's rows [c, K] fp32; outputs dq, dk [c, K] in
  q's dtype and db [c, K] fp32.
  """
  chunk = k_ref.shape[0]
  start = _sub_chunk_start(chunk, sub)
  rows = pl.ds(start, sub)
  q, k, b = q_ref[rows, :].astype(_tile.F32), k_ref[rows, :].astype(_tile.F32), b_ref[rows, :]
  ids = _tile.row_ids(chunk)

  factored = _diagonal_rows(b_ref, start, sub)  # dA is zero above the diagonal: no mask of the block needed
  b_first = b_ref[pl.ds(start, 1), :]
  k_to_first = k_ref[...].astype(_tile.F32) * _tile.masked_exp(ids < start + factored, b_first - b_ref[...])
  dq = jnp.exp(b - b_first) * _tile.dot(da_ref[rows, :], k_to_first, dtype)

  b_last = b_ref[pl.ds(start + sub - 1, 1), :]
  q_from_last = (q_ref[...].astype(_tile.F32)
                 * _tile.masked_exp(ids >= start + sub - factored, b_ref[...] - b_last))
  dk = jnp.exp(b_last - b) * _tile.dot(da_ref[:, rows], q_from_last, dtype, trans_a=True)

  local = _tile.row_ids(sub)

  def diagonal(t, grads):
    dq, dk = grads
    other = pl.ds(start + t, 1)  # column j of dq's pairs, row i of dk's pairs
    b_other = b_ref[other, :]
    dq += da_ref[rows, other] * k_ref[other, :].astype(_tile.F32) * _tile.masked_exp(local >= t, b - b_other)
    dk += (jnp.transpose(da_ref[other, rows]) * q_ref[other, :].astype(_tile.F32)
           * _tile.masked_exp(local <= t, b_other - b))
    return dq, dk

  dq, dk = lax.fori_loop(0, sub - factored, diagonal, (dq, dk))
  dq_out[...] = (dq_ref[...] + dq).astype(dq_out.dtype)
  dk_out[...] = (dk_ref[...] + dk).astype(dk_out.dtype)
  db_out[...] = db_ref[...] + q * dq - k * dk


def _chunk_of_sub_chunk(chunk: int, sub: int) -> _tile.BlockIndex:
  """Block index of the whole chunk around the sub-chunk of grid index i."""
  per_chunk = chunk // sub
  return lambda i, j: i // per_chunk


def _sub_chunk_specs(heads: int, chunk: int, sub: int, widths: tuple[int, ...],
                     sub_widths: tuple[int, ...]) -> list[pl.BlockSpec]:
  """Specs of whole-chunk blocks [C, width], then of sub-chunk blocks [c, width]; grid (sub-chunk, bh, 0)."""
  first = lambda i, j: 0  # noqa: E731
  chunk_specs = [_tile.token_spec(heads, chunk, w, _chunk_of_sub_chunk(chunk, sub), first) for w in widths]
  sub_specs = [_tile.token_spec(heads, sub, w, lambda i, j: i, first) for w in sub_widths]
  return chunk_specs + sub_specs


def intra_scores(q: jax.Array, k: jax.Array, b: jax.Array, *, chunk: int, sub: int,
                 docs: jax.Array | None = None, num_warps: int = _platform.DEFAULT_NUM_WARPS) -> jax.Array:
  """Causal intra-chunk scores of vector decay.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    b: cumulative log decay within each chunk [batch, T, heads, K] fp32.
    chunk: C.
    sub: sub-chunk length c, dividing C.
    docs: optional documents [batch, T, 1] int32 (segments.chunk_documents).
    num_warps: warps per program on the GPU (benchmarks/kernels.py --breakdown times 4 and 8).

  Returns:
    A [batch, T, heads, C] fp32: row t holds A_ij for i = t and j over t's chunk (zero for j > i).
  """
  batch, seq, heads, key_dim = q.shape
  kernel, doc_specs, doc_args = _tile.with_documents(
      functools.partial(_scores_kernel, sub=sub, dtype=q.dtype), docs,
      _tile.document_spec(heads, chunk, _chunk_of_sub_chunk(chunk, sub)))
  call = _platform.pallas_call(
      kernel, name="linmoe_gla_intra_scores", grid=(seq // sub, batch * heads, 1),
      in_specs=[*doc_specs, *_sub_chunk_specs(heads, chunk, sub, (key_dim,) * 3, ())],
      out_specs=_sub_chunk_specs(heads, chunk, sub, (), (chunk,)),
      out_shape=[jax.ShapeDtypeStruct((batch, seq, heads, chunk), _tile.F32)], num_warps=num_warps)
  (scores,) = call(*doc_args, q, k, b)
  return scores


def intra_grads(q: jax.Array, k: jax.Array, b: jax.Array, d_scores: jax.Array, dq: jax.Array, dk: jax.Array,
                db: jax.Array, *, chunk: int, sub: int,
                num_warps: int = _platform.DEFAULT_NUM_WARPS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Completes dq, dk and db of vector decay with the intra-chunk terms.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    b: cumulative log decay within each chunk [batch, T, heads, K] fp32.
    d_scores: dL/dA [batch, T, heads, C] fp32, zero for j > i.
    dq, dk, db: inter-chunk parts [batch, T, heads, K] fp32.
    chunk: C.
    sub: sub-chunk length c, dividing C.
    num_warps: warps per program on the GPU.

  Returns:
    dq, dk [batch, T, heads, K] in q's dtype, db [batch, T, heads, K] fp32.
  """
  batch, seq, heads, key_dim = q.shape
  call = _platform.pallas_call(
      functools.partial(_grads_kernel, sub=sub, dtype=q.dtype), name="linmoe_gla_intra_grads",
      grid=(seq // sub, batch * heads, 1),
      in_specs=_sub_chunk_specs(heads, chunk, sub, (key_dim,) * 3 + (chunk,), (key_dim,) * 3),
      out_specs=_sub_chunk_specs(heads, chunk, sub, (), (key_dim,) * 3),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2 + [jax.ShapeDtypeStruct(q.shape, _tile.F32)],
      num_warps=num_warps)
  return tuple(call(q, k, b, d_scores, dq, dk, db))
