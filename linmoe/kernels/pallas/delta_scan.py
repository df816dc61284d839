"""The delta rule's passes over chunks: one program per (batch * head, value block) scans the chunks in order.

With `b` the cumulative log decay inside each chunk, `B = b_C` its last entry, W and U the chunk's WY factors
(`linmoe.kernels.delta_chunked`) and S_n the fp32 state entering chunk n:
  forward:  Delta_n = U_n - W_n S_n,   S_{n+1} = e^B S_n + (K e^{B - b})^T Delta_n;
  backward, from dS = dL/dS_{n+1} and the intra-chunk part dDelta^loc = scale (Q K^T * Gamma * causal)^T dO:
            dDelta_n = dDelta^loc_n + (K e^{B - b}) dS,   dL/dS_n = e^B dS + scale (Q e^b)^T dO_n - W_n^T dDelta_n.
Delta needs all of S's key rows, so a program holds the full key dimension and one block of value columns.
With document boundaries (`delta_segments`), e^B S_n is dropped in a chunk with a boundary, K e^{B - b} keeps
only the keys of the chunk's last document, and Q e^b only the queries that read S_n (W comes masked).

Both passes are affine in the carried state: S_{n+1} = A_n S_n + K~_n^T U_n with A_n = e^B I - K~_n^T W_n
(K~ = K e^{B - b}), and dL/dS_n = A_n^T dS + (the terms of dO). A run of chunks is therefore one map
S -> P S + E, which the same step function yields when it walks the run from [I | 0] with the values of the
identity columns set to zero (P = the run's transitions, E = its end state from zero). `_split_scan` uses
this to cut the N dependent steps of one walk into runs walked in parallel (`state.runs_for`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile
from linmoe.kernels.pallas.state import run_bounds
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


def _forward_step(c: _Chunk, state: jax.Array, w_ref, u: jax.Array, k_ref,
                  dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """(Delta [C, BV], the state leaving the chunk) from the state entering it and the chunk's U [C, BV]."""
  delta = u.astype(_tile.F32) - _tile.dot(w_ref[c.rows, :], state, dtype)
  k_decayed = k_ref[c.rows, :].astype(_tile.F32) * c.key_decay
  return delta, c.state_decay * state + _tile.dot(k_decayed, delta, dtype, trans_a=True)


def _backward_step(c: _Chunk, d_state: jax.Array, docs, q_ref, k_ref, w_ref, do: jax.Array, *, scale: float,
                   dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """(dDelta [C, BV] fp32, dL/dS entering the chunk) from dL/dS leaving it and the chunk's dO [C, BV]. The
  intra-chunk part of dDelta does not depend on the carried state: it is formed here rather than by a kernel
  of its own, which saves that kernel and an fp32 [T, V] round trip."""
  q, k = q_ref[c.rows, :], k_ref[c.rows, :]
  doc = None if docs is None else docs.index
  scores = _tile.scalar_decay_scores(q, k, c.b, dtype, same=_tile.same_document(doc, doc))
  d_local = scale * _tile.dot(scores, do, dtype, trans_a=True)
  d_delta = d_local + _tile.dot(k.astype(_tile.F32) * c.key_decay, d_state, dtype)
  q_decayed = seg.keep(c.reads_prev, q.astype(_tile.F32) * (scale * jnp.exp(c.b)))
  return d_delta, (c.state_decay * d_state + _tile.dot(q_decayed, do, dtype, trans_a=True)
                   - _tile.dot(w_ref[c.rows, :], d_delta, dtype, trans_a=True))


def _walk_run(body, entry: jax.Array, n_chunks: int, chunk: int, doc_ref, *, reverse: bool, runs: int,
              run_length: int) -> tuple[jax.Array, jax.Array]:
  """(This program's run index, the state after walking its run of scan steps from `entry`)."""
  run, first, last = run_bounds(run_length, n_chunks, runs)
  return run, _tile.over_chunks(body, entry, first, last, n_chunks, chunk, doc_ref, reverse)


def _write_final(final_ref, walked: tuple[jax.Array, jax.Array], runs: int) -> None:
  """The last run's state after its walk is the scan's final state."""
  run, final = walked

  @pl.when(run == runs - 1)
  def _():
    final_ref[...] = final


def _run_map_start(shape: tuple[int, int], identity_blocks: int) -> tuple[jax.Array, jax.Array]:
  """(The state a run-map program starts from, whether its column block carries values): column block j of
  [I | 0] [K, K + V], so the identity blocks (j < identity_blocks) carry no values."""
  j = pl.program_id(2)
  rows = lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, shape, 1) + j * shape[1]
  return (rows == cols).astype(_tile.F32), j >= identity_blocks


def _forward_kernel(w_ref, u_ref, k_ref, b_ref, s0_ref, *refs, chunk: int, dtype: jnp.dtype, segmented: bool,
                    runs: int, run_length: int) -> None:
  """Refs: w, k [T, K], u [T, BV], b [T, 1] fp32, s0 [K, BV] fp32 (this run's entry state), (segmented) the
  document index [T, 1] int32; outputs states [N, K, BV] (the state entering each chunk, in the inputs'
  dtype; this run's rows), delta [T, BV] and final [K, BV] fp32 (by the last run)."""
  doc_ref, (states_ref, delta_ref, final_ref) = seg.split_refs(refs, segmented)

  def body(n, state, docs):
    c = _chunk(n, chunk, b_ref, docs)
    states_ref[n] = state.astype(states_ref.dtype)
    delta, state = _forward_step(c, state, w_ref, u_ref[c.rows, :], k_ref, dtype)
    delta_ref[c.rows, :] = delta.astype(delta_ref.dtype)
    return state

  _write_final(final_ref, _walk_run(body, s0_ref[...], states_ref.shape[0], chunk, doc_ref, reverse=False,
                                    runs=runs, run_length=run_length), runs)


def _forward_map_kernel(w_ref, u_ref, k_ref, b_ref, *refs, chunk: int, dtype: jnp.dtype, segmented: bool,
                        runs: int, run_length: int, identity_blocks: int) -> None:
  """The affine map of one run: refs as `_forward_kernel`'s without s0; output [K, BV], column block j of
  [P_r | E_r] (P_r = the run's transitions times I, E_r = its end state from zero)."""
  doc_ref, (map_ref,) = seg.split_refs(refs, segmented)
  start, has_values = _run_map_start(map_ref.shape, identity_blocks)

  def body(n, state, docs):
    c = _chunk(n, chunk, b_ref, docs)
    return _forward_step(c, state, w_ref, jnp.where(has_values, u_ref[c.rows, :], 0), k_ref, dtype)[1]

  map_ref[...] = _walk_run(body, start, b_ref.shape[0] // chunk, chunk, doc_ref, reverse=False, runs=runs,
                           run_length=run_length)[1]


def _backward_kernel(q_ref, k_ref, w_ref, b_ref, do_ref, ds_ref, *refs, chunk: int, scale: float,
                     dtype: jnp.dtype, segmented: bool, runs: int, run_length: int) -> None:
  """Refs: q, k, w [T, K], b [T, 1] fp32, do [T, BV], ds [K, BV] fp32 (dL/dS leaving this run: d final state
  for the last chunks), (segmented) the document index [T, 1] int32; outputs d_states [N, K, BV] (dL/dS_{n+1}
  of chunk n, in the inputs' dtype), d_delta [T, BV] fp32 and d_s0 [K, BV] fp32 (by the last run)."""
  doc_ref, (d_states_ref, d_delta_ref, d_s0_ref) = seg.split_refs(refs, segmented)

  def body(n, d_state, docs):
    c = _chunk(n, chunk, b_ref, docs)
    d_states_ref[n] = d_state.astype(d_states_ref.dtype)
    d_delta, d_state = _backward_step(c, d_state, docs, q_ref, k_ref, w_ref, do_ref[c.rows, :], scale=scale,
                                      dtype=dtype)
    d_delta_ref[c.rows, :] = d_delta
    return d_state

  _write_final(d_s0_ref, _walk_run(body, ds_ref[...], d_states_ref.shape[0], chunk, doc_ref, reverse=True,
                                   runs=runs, run_length=run_length), runs)


def _backward_map_kernel(q_ref, k_ref, w_ref, b_ref, do_ref, *refs, chunk: int, scale: float, dtype: jnp.dtype,
                         segmented: bool, runs: int, run_length: int, identity_blocks: int) -> None:
  """`_forward_map_kernel` for the backward recurrence (transposed transitions, in reverse chunk order)."""
  doc_ref, (map_ref,) = seg.split_refs(refs, segmented)
  start, has_values = _run_map_start(map_ref.shape, identity_blocks)

  def body(n, d_state, docs):
    c = _chunk(n, chunk, b_ref, docs)
    do = jnp.where(has_values, do_ref[c.rows, :], 0)
    return _backward_step(c, d_state, docs, q_ref, k_ref, w_ref, do, scale=scale, dtype=dtype)[1]

  map_ref[...] = _walk_run(body, start, b_ref.shape[0] // chunk, chunk, doc_ref, reverse=True, runs=runs,
                           run_length=run_length)[1]


def _fold_kernel(map_ref, ends_ref, s0_ref, entries_ref, *, dtype: jnp.dtype) -> None:
  """The state entering each run: S_0 = s0, S_{r+1} = P_r S_r + E_r. Refs: the run maps' P [R, K, K] and
  E [R, K, BV] fp32 (both blocks of one [batch, R, heads, K, K + V] array), s0 [K, BV]; output [R, K, BV] fp32."""
  def body(r, entry):
    entries_ref[r] = entry
    return _tile.dot(map_ref[r], entry, dtype) + ends_ref[r]

  lax.fori_loop(0, entries_ref.shape[0], body, s0_ref[...])


_WHOLE, _BLOCK, _RUN = (lambda i, j: 0), (lambda i, j: j), (lambda i, j: i)


def _specs(heads: int, seq: int, n_chunks: int, key_dim: int, block_v: int, runs: int) -> dict:
  """Block specs of the scans' operands by kind: whole key rows, value blocks, decay, document index, states;
  for runs > 1 the run maps [batch, R, heads, K, K + V] (written by column block; read as P [R, K, K] and as
  E's value block) and the runs' entry states [batch, R, heads, K, V]."""
  identity_blocks = key_dim // block_v
  return {
      "keys": _tile.token_spec(heads, seq, key_dim, _WHOLE, _WHOLE),
      "values": _tile.token_spec(heads, seq, block_v, _WHOLE, _BLOCK),
      "map_values": _tile.token_spec(heads, seq, block_v, _WHOLE,
                                     lambda i, j: jnp.maximum(j - identity_blocks, 0)),
      "decay": _tile.token_spec(heads, seq, 1, _WHOLE, _WHOLE),
      "doc": _tile.document_spec(heads, seq, _WHOLE),
      "state": _tile.head_state_spec(heads, key_dim, block_v, _WHOLE, _BLOCK),
      "states": _tile.chunk_state_spec(heads, n_chunks, key_dim, block_v, _WHOLE, _WHOLE, _BLOCK),
      "map": _tile.chunk_state_spec(heads, None, key_dim, block_v, _RUN, _WHOLE, _BLOCK),
      "map_p": _tile.chunk_state_spec(heads, runs, key_dim, key_dim, _WHOLE, _WHOLE, _WHOLE),
      "map_e": _tile.chunk_state_spec(heads, runs, key_dim, block_v, _WHOLE, _WHOLE,
                                      lambda i, j: identity_blocks + j),
      "entries": _tile.chunk_state_spec(heads, runs, key_dim, block_v, _WHOLE, _WHOLE, _BLOCK),
      "entry": _tile.chunk_state_spec(heads, None, key_dim, block_v, _RUN, _WHOLE, _BLOCK),
  }


def _split_scan(kernel, map_kernel, name: str, token_args: tuple, token_specs: list, map_specs: list,
                initial: jax.Array, doc: jax.Array | None, out_specs: list, out_shape: list, *, spec: dict,
                runs: int, block_v: int, settings: dict) -> list[jax.Array]:
  """One scan over the chunks cut into `runs` runs: with runs > 1, (1) each run's affine map [P_r | E_r] from
  `map_kernel`, all runs and the K + V columns of [I | 0] in parallel; (2) the runs' entry states folded in
  order (`_fold_kernel`); (3) `kernel` walks every run from its entry state, all runs in parallel. The chain
  of dependent steps is 2 L + runs for L chunks a run (instead of N), for three times the matmul work.
  `settings`: the kernels' static keywords but runs and the run length, which are added here."""
  batch, seq, heads, key_dim = token_args[0].shape
  value_dim = initial.shape[-1]
  settings = {**settings, "runs": runs, "run_length": -(-seq // settings["chunk"] // runs)}
  dtype, n_stages = settings["dtype"], NUM_STAGES[settings["dtype"].itemsize]
  doc_specs = [spec["doc"]] * (doc is not None)
  entry_spec = spec["state"]
  if runs > 1:
    width = key_dim + value_dim
    maps = _platform.pallas_call(
        functools.partial(map_kernel, **settings, identity_blocks=key_dim // block_v), name=f"{name}_map",
        grid=(runs, batch * heads, width // block_v), num_stages=n_stages, in_specs=map_specs + doc_specs,
        out_specs=[spec["map"]],
        out_shape=[jax.ShapeDtypeStruct((batch, runs, heads, key_dim, width), _tile.F32)],
    )(*seg.with_doc(token_args, doc))[0]
    initial = _platform.pallas_call(
        functools.partial(_fold_kernel, dtype=dtype), name=f"{name}_fold", grid=(1, batch * heads,
                                                                                  value_dim // block_v),
        num_stages=1, in_specs=[spec["map_p"], spec["map_e"], spec["state"]], out_specs=[spec["entries"]],
        out_shape=[jax.ShapeDtypeStruct((batch, runs, heads, key_dim, value_dim), _tile.F32)],
    )(maps, maps, initial)[0]
    entry_spec = spec["entry"]
  return _platform.pallas_call(
      functools.partial(kernel, **settings), name=name, grid=(runs, batch * heads, value_dim // block_v),
      num_stages=n_stages, in_specs=[*token_specs, entry_spec, *doc_specs], out_specs=out_specs,
      out_shape=out_shape)(*seg.with_doc((*token_args, initial), doc))


def forward_scan(w: jax.Array, u: jax.Array, k: jax.Array, b: jax.Array, initial: jax.Array,
                 doc: jax.Array | None, *, chunk: int, block_v: int,
                 runs: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    runs: runs of chunks walked in parallel (`_split_scan`); 1 is one walk over every chunk.

  Returns:
    states [batch, T / C, heads, K, V] and Delta [batch, T, heads, V] in u's dtype, final state
    [batch, heads, K, V] fp32.
  """
  batch, seq, heads, key_dim = k.shape
  n_chunks = seq // chunk
  spec = _specs(heads, seq, n_chunks, key_dim, block_v, runs)
  settings = {"chunk": chunk, "dtype": u.dtype, "segmented": doc is not None}
  states, delta, final = _split_scan(
      _forward_kernel, _forward_map_kernel, "linmoe_delta_scan", (w, u, k, b),
      [spec["keys"], spec["values"], spec["keys"], spec["decay"]],
      [spec["keys"], spec["map_values"], spec["keys"], spec["decay"]], initial, doc,
      [spec["states"], spec["values"], spec["state"]],
      [jax.ShapeDtypeStruct((batch, n_chunks, heads, key_dim, u.shape[-1]), u.dtype),
       jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(initial.shape, _tile.F32)],
      spec=spec, runs=runs, block_v=block_v, settings=settings)
  return states, delta, final


def backward_scan(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array, do: jax.Array, d_final: jax.Array,
                  doc: jax.Array | None, *, chunk: int, scale: float, block_v: int,
                  runs: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    runs: as `forward_scan`.

  Returns:
    d_states [batch, T / C, heads, K, V] in do's dtype (entry n: dL/dS_{n+1}), dDelta [batch, T, heads, V] fp32,
    dL/d initial state [batch, heads, K, V] fp32.
  """
  batch, seq, heads, key_dim = k.shape
  n_chunks = seq // chunk
  spec = _specs(heads, seq, n_chunks, key_dim, block_v, runs)
  settings = {"chunk": chunk, "scale": scale, "dtype": do.dtype, "segmented": doc is not None}
  keys = [spec["keys"]] * 3
  d_states, d_delta, d_initial = _split_scan(
      _backward_kernel, _backward_map_kernel, "linmoe_delta_scan_bwd", (q, k, w, b, do),
      [*keys, spec["decay"], spec["values"]], [*keys, spec["decay"], spec["map_values"]], d_final, doc,
      [spec["states"], spec["values"], spec["state"]],
      [jax.ShapeDtypeStruct((batch, n_chunks, heads, key_dim, do.shape[-1]), do.dtype),
       jax.ShapeDtypeStruct(do.shape, _tile.F32), jax.ShapeDtypeStruct(d_final.shape, _tile.F32)],
      spec=spec, runs=runs, block_v=block_v, settings=settings)
  return d_states, d_delta, d_initial
