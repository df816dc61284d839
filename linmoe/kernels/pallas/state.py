"""The inter-chunk pass: the state entering every chunk, scanned over the chunks in order, forward or backward.

One kernel serves both directions of the recurrence over chunk boundaries. With `b` the cumulative log decay
inside each chunk and `b_C` its last entry:
  forward  (x = k, y = v):        S_{n+1} = e^{b_C} S_n + (x * e^{b_C - b})^T y,  from the initial state;
  backward (x = scale * q, y = do): dS_n = e^{b_C} dS_{n+1} + (x * e^{b})^T y,      from d final_state.
The state entering each chunk (in scan order) is stored for the parallel per-chunk kernels: in y's dtype for
scalar decay (their matmuls take it in that dtype anyway; bf16 halves the bytes of the largest arrays of the
pass), fp32 for vector decay (the dq/dk/db kernel forms the decay gradient's state term, per key channel,
from the fp32 product h_n * dE). The scan itself carries it in fp32.
With segment ids the state passes through a chunk only if the chunk has no boundary (e^{b_C} is then masked to
0), the forward sums the keys of the chunk's last document only and the backward the queries that read the
incoming state (those of its first document): XLA folds these masks into the exponents once, as -inf
(`_masked_exponents`), so the loop's steps are those of unpacked rows.

One program per (key block, batch * head, value block) walks the chunks one after the other, about 2 us a
chunk on an H100 whatever the block: with few (batch, head) pairs and many chunks that chain is the whole
time. So the N chunks are cut, in scan order, into `runs` runs of L = ceil(N / runs) chunks:
  1. `_run_end_kernel`, all runs in parallel: E_r, the state at the end of run r started from zero;
  2. `_run_decays` (XLA): D_r, the product of the chunk decays e^{b_C} of run r (0 if a document starts in
     it), a scalar for scalar decay and a vector [K] for vector decay;
  3. `_scan_kernel`, all runs in parallel: each program first folds the runs before its own into its entry
     state, S_r = D_{r-1}[:, None] * S_{r-1} + E_{r-1} (elementwise over the key rows) from S_0 = the
     initial state, then walks its run storing the states, and the last run writes the final state.
The longest chain of dependent steps is then 2 L + runs instead of N, for twice the matmul work.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linmoe.kernels.pallas import _platform, _tile

# Pipelining depth of the loop over chunks, by decay. On an H100 (1 x 16K and 8 x 2K tokens, 8 heads, dim 128,
# one run each) 3 stages beat 2 by 4-14% for scalar decay and lost by 25-35% for vector decay.
SCAN_NUM_STAGES = {"scalar": 3, "vector": 2}
# Fewest chunks for the split scan (`runs_for`). On an H100 (8 heads, dim 128, bf16, forward scan alone) the
# split lost at 8 x 2K (32 chunks of 64: 0.31 ms in 2 runs against 0.26 in one) and tied at 4 x 4K (64 chunks),
# then won: 2 x 8K 0.30 ms (8 runs) against 0.37, 1 x 16K 0.30 (8) against 0.63, 1 x 64K 0.87 (16) against 1.61.
# Measured for scalar decay; vector decay takes the same rule (its scan costs about as much a chunk).
SPLIT_MIN_CHUNKS = 128


def check_runs(runs: int, who: str) -> None:
  """Raises ValueError, naming `who` and the value, unless runs is a power of two (1 included)."""
  if runs < 1 or runs & (runs - 1):
    raise ValueError(f"{who} needs runs to be a power of two, got {runs}")


def runs_for(n_chunks: int) -> int:
  """Runs of the split scan: the largest power of two <= sqrt(N / 2), which about balances the 2 L steps of
  the two passes against the runs folded in; 1 (one walk over every chunk) below SPLIT_MIN_CHUNKS chunks."""
  if n_chunks < SPLIT_MIN_CHUNKS:
    return 1
  return 2 ** int(math.log2(n_chunks / 2) / 2)


def _walk(ld_ref, x_ref, y_ref, b_ref, state: jax.Array, first, last, states_ref, *, chunk: int, reverse: bool,
          factor: float, dtype: jnp.dtype) -> jax.Array:
  """Applies the chunks of scan steps [first, last) to state [BK, BV] fp32 and returns the state after them;
  stores the state entering each of those chunks in states_ref [N, BK, BV] unless it is None.

  Refs as in `_scan_kernel`; first <= last <= N are ints or int32 scalars.
  """
  def body(n, state, docs):
    del docs
    start = _tile.chunk_start(n, chunk)
    rows = pl.ds(start, chunk)
    if states_ref is not None:
      states_ref[n] = state.astype(states_ref.dtype)
    if ld_ref is None:  # b_ref holds b
      b = b_ref[rows, :]
      log_decay = b_ref[start + chunk - 1, :]  # [Kg]
      exponent = b if reverse else log_decay[None, :] - b
    else:  # b_ref holds x's exponents and ld_ref the chunk log decays, masked (`_masked_exponents`)
      exponent, log_decay = b_ref[rows, :], ld_ref[n, :]
    x = x_ref[rows, :].astype(_tile.F32) * (factor * jnp.exp(exponent))
    update = _tile.dot(x, y_ref[rows, :], dtype, trans_a=True)
    return jnp.exp(log_decay)[:, None] * state + update

  return _tile.over_chunks(body, state, first, last, x_ref.shape[0] // chunk, chunk, None, reverse)


def run_bounds(run_length: int, n_chunks: int, runs: int) -> tuple:
  """Run index of this program (grid axis 0 is key block * runs + run) and its scan steps [first, last), empty
  for a run past the last chunk."""
  run = pl.program_id(0) % runs
  return run, jnp.minimum(run * run_length, n_chunks), jnp.minimum((run + 1) * run_length, n_chunks)


def _run_end_kernel(ld_ref, x_ref, y_ref, b_ref, end_ref, *, chunk: int, reverse: bool, factor: float,
                    dtype: jnp.dtype, runs: int, run_length: int) -> None:
  """E_r: the state after run r of one (batch, head, key block, value block), started from zero.

  Refs as in `_scan_kernel`; output end [BK, BV] fp32.
  """
  n_chunks = x_ref.shape[0] // chunk
  _, first, last = run_bounds(run_length, n_chunks, runs)
  zero = jnp.zeros(end_ref.shape, _tile.F32)
  end_ref[...] = _walk(ld_ref, x_ref, y_ref, b_ref, zero, first, last, None, chunk=chunk, reverse=reverse,
                       factor=factor, dtype=dtype)


def _scan_kernel(ld_ref, x_ref, y_ref, b_ref, s0_ref, *refs, chunk: int, reverse: bool, factor: float,
                 dtype: jnp.dtype, runs: int, run_length: int) -> None:
  """Walks one run of chunks of one (batch, head, key block, value block), storing the states.

  Refs: ld None, or with segment ids the masked chunk log decays [N, Kg] fp32; x [T, BK], y [T, BV]; b [T, Kg]
  fp32 (Kg 1 or BK), the cumulative log decay b, or with ld x's masked exponents (`_masked_exponents`);
  s0 [BK, BV] fp32;
  with runs > 1 the run ends E [R, BK, BV] and decays D [R, Kg] fp32 (else None); outputs: states [N, BK, BV]
  (the state entering each chunk in scan order, this run's rows) and final [BK, BV] fp32 (by the last run).
  """
  ends_ref, decays_ref, states_ref, final_ref = refs if runs > 1 else (None, None, *refs)
  n_chunks = states_ref.shape[0]
  walk = functools.partial(_walk, ld_ref, x_ref, y_ref, b_ref, chunk=chunk, reverse=reverse, factor=factor,
                           dtype=dtype)
  if runs == 1:
    final_ref[...] = walk(s0_ref[...], 0, n_chunks, states_ref)
    return
  run, first, last = run_bounds(run_length, n_chunks, runs)
  entry = lax.fori_loop(0, run, lambda r, s: decays_ref[r, :][:, None] * s + ends_ref[r], s0_ref[...])
  state = walk(entry, first, last, states_ref)

  @pl.when(run == runs - 1)
  def _():
    final_ref[...] = state


def _run_decays(log_decay: jax.Array, reverse: bool, runs: int, run_length: int) -> jax.Array:
  """D_r, the decay through each run in scan order: [batch, runs, heads, Kg] fp32 from the chunk log decays
  [batch, N, heads, Kg] (-inf in a chunk a document starts in, so 0 through its run)."""
  pad = runs * run_length - log_decay.shape[1]
  ordered = log_decay[:, ::-1] if reverse else log_decay
  ordered = jnp.pad(ordered, [(0, 0), (0, pad), (0, 0), (0, 0)])
  return jnp.exp(jnp.sum(ordered.reshape(log_decay.shape[0], runs, run_length, *log_decay.shape[2:]), axis=2))


def _masked_exponents(b: jax.Array, docs: jax.Array, chunk: int, reverse: bool) -> tuple[jax.Array, jax.Array]:
  """The scan's exponents with the document masks folded in (-inf where masked), computed once outside the
  loop: on an H100 masking inside every step lengthened the chain by about a third (simple_gla, 4 x 4K).

  Args:
    b: cumulative log decay within each chunk [batch, T, heads, Kg] fp32.
    docs: documents [batch, T, 1] int32 (segments.chunk_documents).
    chunk: C.
    reverse: the backward pass.

  Returns:
    x's exponents [batch, T, heads, Kg] (b_C - b forward, b backward; -inf outside the document that writes,
    forward, or reads, backward, the edge's state) and the chunk log decays b_C [batch, N, heads, Kg] (-inf in
    a chunk with a boundary), fp32.
  """
  batch, seq, heads, decay_dim = b.shape
  b_c = b.reshape(batch, seq // chunk, chunk, heads, decay_dim)
  b_end = b_c[:, :, -1:]
  doc = docs.reshape(batch, seq // chunk, chunk, 1, 1)
  doc_end = doc[:, :, -1:]
  exponent = jnp.where(doc == 0, b_c, -jnp.inf) if reverse else jnp.where(doc == doc_end, b_end - b_c, -jnp.inf)
  return exponent.reshape(b.shape), jnp.where(doc_end == 0, b_end, -jnp.inf)[:, :, 0]


def chunk_scan(x: jax.Array, y: jax.Array, b: jax.Array, initial: jax.Array, *, chunk: int, reverse: bool,
               factor: float, block_k: int, block_v: int, num_stages: int | None = None,
               docs: jax.Array | None = None, runs: int | None = None) -> tuple[jax.Array, jax.Array]:
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
    runs: runs of chunks walked in parallel (a power of two; 1 is one walk over every chunk); None takes
      `runs_for`.

  Returns:
    states [batch, T / C, heads, K, V], in y's dtype for scalar decay, fp32 for vector decay: entry n is the
    state before chunk n is applied in scan order (h_n forward, dL/dh_{n+1} backward); and the final state
    [batch, heads, K, V] fp32.
  """
  batch, seq, heads, key_dim = x.shape
  value_dim, decay_dim = y.shape[-1], b.shape[-1]
  n_chunks = seq // chunk
  vector_decay = decay_dim > 1
  runs = runs_for(n_chunks) if runs is None else runs
  check_runs(runs, "chunk_scan")
  if num_stages is None:
    num_stages = SCAN_NUM_STAGES["vector" if vector_decay else "scalar"]
  n_key_blocks, run_length = key_dim // block_k, -(-n_chunks // runs)
  key_block, value_block = (lambda i, j: i // runs), (lambda i, j: j)
  run, first = (lambda i, j: i % runs), (lambda i, j: 0)
  block_g, decay_block = (block_k, key_block) if vector_decay else (1, first)
  token_specs = [
      _tile.token_spec(heads, seq, block_k, first, key_block),
      _tile.token_spec(heads, seq, block_v, first, value_block),
      _tile.token_spec(heads, seq, block_g, first, decay_block),
  ]
  state_spec = functools.partial(_tile.chunk_state_spec, heads, block_k=block_k, block_v=block_v,
                                 k_block=key_block, v_block=value_block)
  head_state_spec = _tile.head_state_spec(heads, block_k, block_v, key_block, value_block)
  settings = {"chunk": chunk, "reverse": reverse, "factor": factor, "dtype": y.dtype, "runs": runs,
              "run_length": run_length}
  direction = "_bwd" if reverse else ""

  # Packed rows: the masked exponents replace b, and the chunk log decays come as a first input.
  exponents, log_decay = (b, None) if docs is None else _masked_exponents(b, docs, chunk, reverse)

  def call(kernel, name, in_specs, out_specs, out_shape, *args):
    kernel, lead_specs, lead_args = _tile.with_documents(
        functools.partial(kernel, **settings), log_decay,
        _tile.token_spec(heads, n_chunks, block_g, first, decay_block))
    return _platform.pallas_call(
        kernel, name=f"{name}{direction}", grid=(n_key_blocks * runs, batch * heads, value_dim // block_v),
        num_stages=num_stages, in_specs=[*lead_specs, *token_specs, *in_specs], out_specs=out_specs,
        out_shape=out_shape)(*lead_args, x, y, exponents, *args)

  run_specs, run_args = [], ()
  if runs > 1:
    (ends,) = call(_run_end_kernel, "linmoe_chunk_scan_ends", [], [state_spec(None, chunk=run)],
                   [jax.ShapeDtypeStruct((batch, runs, heads, key_dim, value_dim), _tile.F32)])
    run_specs = [state_spec(runs, chunk=first), _tile.token_spec(heads, runs, block_g, first, decay_block)]
    chunk_log_decays = b[:, chunk - 1::chunk] if log_decay is None else log_decay
    run_args = (ends, _run_decays(chunk_log_decays, reverse, runs, run_length))
  states, final = call(
      _scan_kernel, "linmoe_chunk_scan", [head_state_spec, *run_specs],
      [state_spec(n_chunks, chunk=first), head_state_spec],
      [jax.ShapeDtypeStruct((batch, n_chunks, heads, key_dim, value_dim), _tile.F32 if vector_decay else y.dtype),
       jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), _tile.F32)],
      initial, *run_args)
  return states, final
