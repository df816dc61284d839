"""The inter-chunk pass: one program per (key block, batch * head, value block) scans the chunks in order.

One kernel serves both directions of the recurrence over chunk boundaries. With `b` the cumulative log decay
inside each chunk and `b_C` its last entry:
  forward  (x = k, y = v):        S_{n+1} = e^{b_C} S_n + (x * e^{b_C - b})^T y,  from the initial state;
  backward (x = scale * q, y = do): dS_n = e^{b_C} dS_{n+1} + (x * e^{b})^T y,      from d final_state.
The state entering each chunk (in scan order) is stored for the parallel per-chunk kernels, fp32.
With segment ids the state passes through a chunk only if the chunk has no boundary (e^{b_C} is then masked to
0), the forward sums the keys of the chunk's last document only and the backward the queries that read the
incoming state (those of its first document).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile

# Pipelining depth of the loop over chunks, by decay. On an H100 (1 x 16K and 8 x 2K tokens, 8 heads, dim 128,
# one run each) 3 stages beat 2 by 4-14% for scalar decay and lost by 25-35% for vector decay.
SCAN_NUM_STAGES = {"scalar": 3, "vector": 2}


def _scan_kernel(d_ref, x_ref, y_ref, b_ref, s0_ref, states_ref, final_ref, *, chunk: int, reverse: bool,
                 factor: float, dtype: jnp.dtype) -> None:
  """Scans the chunks of one (batch, head, key block, value block).

  Refs: d [T, 1] int32 documents or None, x [T, BK], y [T, BV], b [T, Kg] fp32 (Kg 1 or BK), s0 [BK, BV]
  fp32; outputs: states [N, BK, BV] (the state entering each chunk in scan order) and final [BK, BV], fp32.
  """
  n_chunks = states_ref.shape[0]
  chunk_of = lambda step: n_chunks - 1 - step if reverse else step  # noqa: E731
  start_of = lambda n: pl.multiple_of(n * chunk, chunk)  # noqa: E731

  def body(step, carry):
    state, d = carry
    n = chunk_of(step)
    start = start_of(n)
    rows = pl.ds(start, chunk)
    states_ref[n] = state
    b = b_ref[rows, :]
    b_end = b_ref[start + chunk - 1, :]  # [Kg]
    exponent = b if reverse else b_end[None, :] - b
    mask = d_next = None
    if d is not None:  # Rows of the document that reads (backward) or writes (forward) the edge's state.
      # The next chunk's documents are loaded one step ahead: the loop's pipelining leaves this load out, and
      # waiting for it made packed rows 27% slower at 1 x 64K (simple_gla fwd + bwd, H100; 4% with this).
      d_next = d_ref[pl.ds(start_of(chunk_of(jnp.minimum(step + 1, n_chunks - 1))), chunk), :]
      d_end = jnp.max(d)  # Documents only count up within a chunk.
      mask = d == 0 if reverse else d == d_end
    x = x_ref[rows, :].astype(_tile.F32) * (factor * _tile.masked_exp(mask, exponent))
    update = _tile.dot(x, y_ref[rows, :], dtype, trans_a=True)
    decay = jnp.exp(b_end) if d is None else jnp.where(d_end == 0, jnp.exp(b_end), 0.0)
    return decay[:, None] * state + update, d_next

  first_docs = None if d_ref is None else d_ref[pl.ds(chunk_of(0) * chunk, chunk), :]
  final_ref[...], _ = lax.fori_loop(0, n_chunks, body, (s0_ref[...], first_docs))


def chunk_scan(x: jax.Array, y: jax.Array, b: jax.Array, initial: jax.Array, *, chunk: int, reverse: bool,
               factor: float, block_k: int, block_v: int, num_stages: int | None = None,
               docs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """States entering every chunk, and the last state, of the forward or backward pass over chunks.

  Args:
    x: k (forward) or q (backward) [batch, T, heads, K], T a multiple of chunk.
    y: v (forward) or do (backward) [batch, T, heads, V].
    b: cumulative log decay within each chunk [batch, T, heads, Kg] fp32, Kg in {1, K}.
    initial: state the scan starts from [batch, heads, K, V] fp32.
    chunk: C.
    reverse: scan from the last chunk to the first (the backward pass).
    factor: multiplies x (the output scale in the backward pass).
    block_k: key block of one program, dividing K.
    block_v: value block of one program, dividing V.
    num_stages: software-pipelining depth of the loop over chunks on the GPU (loads run this far ahead);
      None takes SCAN_NUM_STAGES of the decay.
    docs: optional documents [batch, T, 1] int32 (segments.chunk_documents).

  Returns:
    states [batch, T / C, heads, K, V] fp32: entry n is the state before chunk n is applied in scan order
    (h_n forward, dL/dh_{n+1} backward); and the final state [batch, heads, K, V] fp32.
  """
  batch, seq, heads, key_dim = x.shape
  value_dim, decay_dim = y.shape[-1], b.shape[-1]
  n_chunks = seq // chunk
  vector_decay = decay_dim > 1
  if num_stages is None:
    num_stages = SCAN_NUM_STAGES["vector" if vector_decay else "scalar"]
  key_block, value_block, first = (lambda i, j: i), (lambda i, j: j), (lambda i, j: 0)
  decay_spec = _tile.token_spec(heads, seq, block_k if vector_decay else 1, first,
                                key_block if vector_decay else first)
  kernel, doc_specs, doc_args = _tile.with_documents(
      functools.partial(_scan_kernel, chunk=chunk, reverse=reverse, factor=factor, dtype=y.dtype), docs,
      _tile.document_spec(heads, seq, first))
  call = _platform.pallas_call(
      kernel, name="linmoe_chunk_scan_bwd" if reverse else "linmoe_chunk_scan",
      grid=(key_dim // block_k, batch * heads, value_dim // block_v), num_stages=num_stages,
      in_specs=[
          *doc_specs,
          _tile.token_spec(heads, seq, block_k, first, key_block),
          _tile.token_spec(heads, seq, block_v, first, value_block),
          decay_spec,
          _tile.head_state_spec(heads, block_k, block_v, key_block, value_block),
      ],
      out_specs=[
          _tile.chunk_state_spec(heads, n_chunks, block_k, block_v, first, key_block, value_block),
          _tile.head_state_spec(heads, block_k, block_v, key_block, value_block),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, n_chunks, heads, key_dim, value_dim), _tile.F32),
          jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), _tile.F32),
      ])
  states, final = call(*doc_args, x, y, b, initial)
  return states, final
