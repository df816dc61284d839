"""The delta rule's passes over chunks: one program per (batch * head, value block) scans the chunks in order.

With `b` the cumulative log decay inside each chunk, `B = b_C` its last entry, W and U the chunk's WY factors
(`linmoe.kernels.delta_chunked`) and S_n the fp32 state entering chunk n:
  forward:  Delta_n = U_n - W_n S_n,   S_{n+1} = e^B S_n + (K e^{B - b})^T Delta_n;
  backward, from dS = dL/dS_{n+1} and the intra-chunk part dDelta^loc = scale (Q K^T * Gamma * causal)^T dO:
            dDelta_n = dDelta^loc_n + (K e^{B - b}) dS,   dL/dS_n = e^B dS + scale (Q e^b)^T dO_n - W_n^T dDelta_n.
Delta needs all of S's key rows, so a program holds the full key dimension and one block of value columns.
With document boundaries (`delta_segments`), e^B S_n is dropped in a chunk with a boundary, K e^{B - b} keeps
only the keys of the chunk's last document, and Q e^b only the queries that read S_n (W comes masked).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile
from linmoe.kernels.pallas import delta_segments as seg

# Pipelining depth of the loop over chunks on the GPU, by input itemsize: fp32 tiles of whole key rows at
# three stages overflow an H100's shared memory.
NUM_STAGES = {2: 3, 4: 1}


class _Chunk(NamedTuple):
  """Chunk n of a scan: its row slice, cumulative log decay b [C, 1] fp32, decays of the keys to the chunk's
  end e^{B - b} [C, 1] (masked to its last document) and of the incoming state e^B [1, 1] (0 when it does not
  pass through), and the rows that read the incoming state [C, 1] bool (None without boundaries)."""
  rows: pl.Slice
  b: jax.Array
  key_decay: jax.Array
  state_decay: jax.Array
  reads_prev: jax.Array | None


def _chunk(n: jax.Array, chunk: int, b_ref, docs: _tile.ChunkDocs | None) -> _Chunk:
  """The `_Chunk` of chunk n from the decay ref [T, 1] and the chunk's documents (or None)."""
  start = _tile.chunk_start(n, chunk)
  rows = pl.ds(start, chunk)
  b, b_end = b_ref[rows, :], b_ref[pl.ds(start + chunk - 1, 1), :]
  doc, doc_end = (None, None) if docs is None else docs
  return _Chunk(rows, b, seg.keep(seg.in_last(doc, doc_end), jnp.exp(b_end - b)),
                seg.keep(seg.carries(doc_end), jnp.exp(b_end)), seg.reads_prev(doc))


def _forward_kernel(w_ref, u_ref, k_ref, b_ref, s0_ref, *refs, chunk: int, dtype: jnp.dtype,
                    segmented: bool) -> None:
  """Refs: w, k [T, K], u [T, BV], b [T, 1] fp32, s0 [K, BV] fp32, (segmented) the document index [T, 1]
  int32; outputs states [N, K, BV] (the state entering each chunk, in the inputs' dtype), delta [T, BV] and
  final [K, BV] fp32."""
  doc_ref, (states_ref, delta_ref, final_ref) = seg.split_refs(refs, segmented)

  def body(n, state, docs):
    c = _chunk(n, chunk, b_ref, docs)
    states_ref[n] = state.astype(states_ref.dtype)
    delta = u_ref[c.rows, :].astype(_tile.F32) - _tile.dot(w_ref[c.rows, :], state, dtype)
    delta_ref[c.rows, :] = delta.astype(delta_ref.dtype)
    k_decayed = k_ref[c.rows, :].astype(_tile.F32) * c.key_decay
    return c.state_decay * state + _tile.dot(k_decayed, delta, dtype, trans_a=True)

  n_chunks = states_ref.shape[0]
  final_ref[...] = _tile.over_chunks(body, s0_ref[...], 0, n_chunks, n_chunks, chunk, doc_ref, reverse=False)


def _backward_kernel(q_ref, k_ref, w_ref, b_ref, do_ref, ds_ref, *refs, chunk: int, scale: float,
                     dtype: jnp.dtype, segmented: bool) -> None:
  """Refs: q, k, w [T, K], b [T, 1] fp32, do [T, BV], ds [K, BV] fp32 (d final state), (segmented) the document
  index [T, 1] int32; outputs d_states [N, K, BV] (dL/dS_{n+1} of chunk n, in the inputs' dtype), d_delta
  [T, BV] fp32 and d_s0 [K, BV] fp32. The intra-chunk part of dDelta does not depend on the carried state: it
  is formed here rather than by a kernel of its own, which saves that kernel and an fp32 [T, V] round trip."""
  doc_ref, (d_states_ref, d_delta_ref, d_s0_ref) = seg.split_refs(refs, segmented)

  def body(n, d_state, docs):
    c = _chunk(n, chunk, b_ref, docs)
    q, k, do = q_ref[c.rows, :], k_ref[c.rows, :], do_ref[c.rows, :]
    doc = None if docs is None else docs.index
    scores = _tile.scalar_decay_scores(q, k, c.b, dtype, same=_tile.same_document(doc, doc))
    d_local = scale * _tile.dot(scores, do, dtype, trans_a=True)
    d_states_ref[n] = d_state.astype(d_states_ref.dtype)
    d_delta = d_local + _tile.dot(k.astype(_tile.F32) * c.key_decay, d_state, dtype)
    d_delta_ref[c.rows, :] = d_delta
    q_decayed = seg.keep(c.reads_prev, q.astype(_tile.F32) * (scale * jnp.exp(c.b)))
    return (c.state_decay * d_state + _tile.dot(q_decayed, do, dtype, trans_a=True)
            - _tile.dot(w_ref[c.rows, :], d_delta, dtype, trans_a=True))

  n_chunks = d_states_ref.shape[0]
  d_s0_ref[...] = _tile.over_chunks(body, ds_ref[...], 0, n_chunks, n_chunks, chunk, doc_ref, reverse=True)


_WHOLE, _BLOCK = (lambda i, j: 0), (lambda i, j: j)


def _specs(heads: int, seq: int, n_chunks: int, key_dim: int, block_v: int) -> dict:
  """Block specs of the scans' operands by kind: whole key rows, value blocks, decay, document index, states."""
  return {
      "keys": _tile.token_spec(heads, seq, key_dim, _WHOLE, _WHOLE),
      "values": _tile.token_spec(heads, seq, block_v, _WHOLE, _BLOCK),
      "decay": _tile.token_spec(heads, seq, 1, _WHOLE, _WHOLE),
      "doc": _tile.document_spec(heads, seq, _WHOLE),
      "state": _tile.head_state_spec(heads, key_dim, block_v, _WHOLE, _BLOCK),
      "states": _tile.chunk_state_spec(heads, n_chunks, key_dim, block_v, _WHOLE, _WHOLE, _BLOCK),
  }


def forward_scan(w: jax.Array, u: jax.Array, k: jax.Array, b: jax.Array, initial: jax.Array,
                 doc: jax.Array | None, *, chunk: int, block_v: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunk-entry states, corrected values Delta and the final state.

  Args:
    w: W = T (K * e^b) [batch, T, heads, K] (the inputs' dtype), T a multiple of chunk.
    u: U = T V [batch, T, heads, V].
    k: keys [batch, T, heads, K].
    b: cumulative log decay within each chunk [batch, T, heads, 1] fp32.
    initial: initial state [batch, heads, K, V] fp32.
    doc: document index [batch, T, 1] int32 (`delta_segments`) or None.
    chunk: C.
    block_v: value block of one program, dividing V.

  Returns:
    states [batch, T / C, heads, K, V] and Delta [batch, T, heads, V] in u's dtype, final state
    [batch, heads, K, V] fp32.
  """
  batch, seq, heads, key_dim = k.shape
  value_dim = u.shape[-1]
  n_chunks = seq // chunk
  spec = _specs(heads, seq, n_chunks, key_dim, block_v)
  call = _platform.pallas_call(
      functools.partial(_forward_kernel, chunk=chunk, dtype=u.dtype, segmented=doc is not None),
      name="linmoe_delta_scan", grid=(1, batch * heads, value_dim // block_v),
      num_stages=NUM_STAGES[u.dtype.itemsize],
      in_specs=[spec["keys"], spec["values"], spec["keys"], spec["decay"], spec["state"]]
      + [spec["doc"]] * (doc is not None),
      out_specs=[spec["states"], spec["values"], spec["state"]],
      out_shape=[jax.ShapeDtypeStruct((batch, n_chunks, heads, key_dim, value_dim), u.dtype),
                 jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(initial.shape, _tile.F32)])
  states, delta, final = call(*seg.with_doc((w, u, k, b, initial), doc))
  return states, delta, final


def backward_scan(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array, do: jax.Array, d_final: jax.Array,
                  doc: jax.Array | None, *, chunk: int, scale: float,
                  block_v: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of the chunk-leaving states, of Delta, and of the initial state.

  Args:
    q, k, w: [batch, T, heads, K] (the inputs' dtype), T a multiple of chunk.
    b: cumulative log decay within each chunk [batch, T, heads, 1] fp32.
    do: output cotangent [batch, T, heads, V].
    d_final: cotangent of the final state [batch, heads, K, V] fp32.
    doc: as `forward_scan`.
    chunk: C.
    scale: output scale.
    block_v: value block of one program, dividing V.

  Returns:
    d_states [batch, T / C, heads, K, V] in do's dtype (entry n: dL/dS_{n+1}), dDelta [batch, T, heads, V] fp32,
    dL/d initial state [batch, heads, K, V] fp32.
  """
  batch, seq, heads, key_dim = k.shape
  value_dim = do.shape[-1]
  n_chunks = seq // chunk
  spec = _specs(heads, seq, n_chunks, key_dim, block_v)
  call = _platform.pallas_call(
      functools.partial(_backward_kernel, chunk=chunk, scale=scale, dtype=do.dtype, segmented=doc is not None),
      name="linmoe_delta_scan_bwd", grid=(1, batch * heads, value_dim // block_v),
      num_stages=NUM_STAGES[do.dtype.itemsize],
      in_specs=[spec["keys"], spec["keys"], spec["keys"], spec["decay"], spec["values"], spec["state"]]
      + [spec["doc"]] * (doc is not None),
      out_specs=[spec["states"], spec["values"], spec["state"]],
      out_shape=[jax.ShapeDtypeStruct((batch, n_chunks, heads, key_dim, value_dim), do.dtype),
                 jax.ShapeDtypeStruct(do.shape, _tile.F32), jax.ShapeDtypeStruct(d_final.shape, _tile.F32)])
  d_states, d_delta, d_initial = call(*seg.with_doc((q, k, w, b, do, d_final), doc))
  return d_states, d_delta, d_initial
