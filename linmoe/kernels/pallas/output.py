"""Forward outputs, all chunks in parallel: one program per (chunk, batch * head, value block).

  o_i = scale * [(q_i * e^{b_i})^T S_n + sum_{j<=i} A_ij v_j]
with S_n the stored state entering the chunk. Scalar decay builds the causal scores A in the program; vector
decay reads them from `intra.intra_scores`. With segment ids only the rows of the chunk's first document read
S_n, and the scores pair tokens of one document (scalar decay masks them here, `intra` those of vector decay).
"""

import functools

import jax
import jax.numpy as jnp

from linmoe.kernels.pallas import _platform, _tile


def _output_kernel(d_ref, q_ref, v_ref, b_ref, h_ref, s_ref, o_ref, *, scale: float, vector_decay: bool,
                   dtype: jnp.dtype) -> None:
  """Outputs of one chunk and value block.

  Refs: d [C, 1] int32 documents or None, q [C, K], v [C, BV], b [C, Kg] fp32, h [K, BV] (`state.chunk_scan`'s
  dtype), s: k [C, K] (scalar decay) or the scores A [C, C] fp32 (vector decay); output o [C, BV].
  """
  q, b = q_ref[...], b_ref[...]
  d = None if d_ref is None else d_ref[...]
  reads = jnp.exp(b) if d is None else _tile.masked_exp(d == 0, b)
  inter = _tile.dot(q.astype(_tile.F32) * reads, h_ref[...], dtype)
  if vector_decay:
    scores = s_ref[...]
  else:
    scores = _tile.scalar_decay_scores(q, s_ref[...], b, dtype, _tile.same_document(d, d))
  intra = _tile.dot(scores, v_ref[...], dtype)
  o_ref[...] = (scale * (inter + intra)).astype(o_ref.dtype)


def chunk_outputs(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, states: jax.Array,
                  scores: jax.Array | None, *, scale: float, chunk: int, block_v: int,
                  docs: jax.Array | None = None) -> jax.Array:
  """Outputs of every chunk from the chunk-entry states.

  Args:
    q, k: [batch, T, heads, K], T a multiple of chunk.
    v: [batch, T, heads, V].
    b: cumulative log decay within each chunk [batch, T, heads, Kg] fp32, Kg in {1, K}.
    states: state entering each chunk [batch, T / C, heads, K, V] (`state.chunk_scan`'s dtype).
    scores: causal intra-chunk scores [batch, T, heads, C] fp32 (vector decay), or None (scalar decay).
    scale: output scale.
    chunk: C.
    block_v: value block of one program, dividing V.
    docs: optional documents [batch, T, 1] int32 (segments.chunk_documents).

  Returns:
    o [batch, T, heads, V] in v's dtype.
  """
  batch, seq, heads, key_dim = q.shape
  value_dim, decay_dim = v.shape[-1], b.shape[-1]
  vector_decay = scores is not None
  chunk_block, value_block, first = (lambda i, j: i), (lambda i, j: j), (lambda i, j: 0)
  score_source = scores if vector_decay else k
  kernel, doc_specs, doc_args = _tile.with_documents(
      functools.partial(_output_kernel, scale=scale, vector_decay=vector_decay, dtype=v.dtype), docs,
      _tile.document_spec(heads, chunk, chunk_block))
  call = _platform.pallas_call(
      kernel, name="linmoe_chunk_outputs",
      grid=(seq // chunk, batch * heads, value_dim // block_v),
      in_specs=[
          *doc_specs,
          _tile.token_spec(heads, chunk, key_dim, chunk_block, first),
          _tile.token_spec(heads, chunk, block_v, chunk_block, value_block),
          _tile.token_spec(heads, chunk, decay_dim, chunk_block, first),
          _tile.chunk_state_spec(heads, None, key_dim, block_v, chunk_block, first, value_block),
          _tile.token_spec(heads, chunk, score_source.shape[-1], chunk_block, first),
      ],
      out_specs=[_tile.token_spec(heads, chunk, block_v, chunk_block, value_block)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype)])
  (o,) = call(*doc_args, q, v, b, states, score_source)
  return o
