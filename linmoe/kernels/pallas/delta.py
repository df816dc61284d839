"""The (gated) delta rule on Pallas kernels, forward and backward (`jax.custom_vjp`).

The chunked WY form of `linmoe.kernels.delta_chunked`: per chunk, W = M (beta * K e^b) and U = M (beta * V) with
M = (I + strictly_lower(diag(beta) K K^T * Gamma))^{-1}; the sequential pass over chunks forms the corrected
values Delta = U - W S_n and the fp32 states; the outputs of all chunks are then those of the decay recurrence
on Delta (`delta_output.chunk_outputs`).
Forward: `delta_chunk.wy_factors` (W, U, M), `delta_scan.forward_scan` (state entering every chunk, Delta,
final state), `delta_output.chunk_outputs`.
Backward: the residuals are q, k, v, beta, the cumulative log decay b and the forward's W, M, chunk states (in
the inputs' dtype) and Delta, rather than recomputed (a WY pass and a scan: 32% of forward + backward at 1 x 64K
on an H100, for 1.25 KiB more per token and head in bf16, K = V = 128). `delta_scan.backward_scan` gives
dL/dDelta (its intra-chunk part included) and dL/dS at every chunk edge; with Delta in place of v,
`delta_output.query_key_grads` gives the direct parts of dq, dk, db; `delta_chunk.wy_grads` takes the WY
factors' cotangents (dU = dDelta, dW = -dDelta S_n^T) back to k, v, beta and b.
The floor and the within-chunk cumulative sum of g stay outside the custom_vjp, so JAX differentiates them.
Packed documents (segment_ids) reach every kernel as one int32 document index per token (`delta_segments`),
from which each kernel forms exact masks (segments.py's conventions); without segment ids the kernels are
compiled without the index or any mask."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from linmoe.kernels import chunked, common
from linmoe.kernels.pallas import delta_chunk, delta_output, delta_scan, recurrence, state

HEAD_DIMS = (64, 128)  # Key and value dims the kernels take (and the GPU tests cover).
MIN_CHUNK = 16  # Smallest matmul side of the Triton lowering.
# Largest chunk: at C = 128 (K = V = 128, bf16) the backward scan asks an H100 for 320 KiB of shared memory,
# over its 227 KiB, and the forward ran 2.2x slower than at C = 64 (benchmarks/RESULTS.md, tenth session).
MAX_CHUNK = 64
BLOCK_K = 64  # Key block of the key-gradient programs.
# Value block of the scans, whose programs run over batch * heads * value blocks: narrower blocks when few
# (batch * head) programs would leave most of the GPU idle.
WIDE_BLOCK_V, NARROW_BLOCK_V, FEW_PROGRAMS = 64, 32, 64
# Whether a call that gives no `runs` splits its scans into `state.runs_for(N)` runs (from 128 chunks on). Off
# until timed on a GPU (written in the tenth session, which had no device time left): `benchmarks/kernels.py
# --delta-split` times both.
SPLIT_SCANS = False


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call."""
  scale: float
  chunk: int
  block_k: int
  block_v: int
  runs: int


def _scan(k: jax.Array, v: jax.Array, beta: jax.Array, b: jax.Array, h0: jax.Array, doc: jax.Array | None,
          cfg: _Config) -> tuple[jax.Array, ...]:
  """W (k's dtype), M, chunk-entry states, Delta (v's dtype) and the final state."""
  w, u, m = delta_chunk.wy_factors(k, v, beta, b, doc, chunk=cfg.chunk)
  states, delta, final = delta_scan.forward_scan(w, u, k, b, h0, doc, chunk=cfg.chunk, block_v=cfg.block_v,
                                                 runs=cfg.runs)
  return w, m, states, delta, final


def _forward(q, k, v, beta, b, h0, doc, cfg: _Config) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
  """(o [batch, T, heads, V], the final state [batch, heads, K, V] fp32) (T a multiple of the chunk), and the
  forward results the backward pass reuses: W, M, the chunk-entry states and Delta."""
  w, m, states, delta, final = _scan(k, v, beta, b, h0, doc, cfg)
  o = delta_output.chunk_outputs(q, k, delta, b, states, doc, scale=cfg.scale, chunk=cfg.chunk,
                                 block_v=cfg.block_v)
  return (o, final), (w, m, states, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _delta_rule(q, k, v, beta, b, h0, doc, cfg: _Config) -> tuple[jax.Array, jax.Array]:
  return _forward(q, k, v, beta, b, h0, doc, cfg)[0]


def _delta_rule_fwd(q, k, v, beta, b, h0, doc, cfg):
  outputs, saved = _forward(q, k, v, beta, b, h0, doc, cfg)
  return outputs, (q, k, v, beta, b, doc, *saved)


def _delta_rule_bwd(cfg: _Config, residuals: tuple, cotangents: tuple) -> tuple[jax.Array | None, ...]:
  """Gradients of (q, k, v, beta [.., 1], b, h0) from the cotangents of (o, final state); None for the
  document index."""
  q, k, v, beta, b, doc, w, m, states, delta = residuals
  do, d_final = cotangents
  do = do.astype(v.dtype)
  d_states, d_delta, d_h0 = delta_scan.backward_scan(q, k, w, b, do, d_final.astype(jnp.float32), doc,
                                                     chunk=cfg.chunk, scale=cfg.scale, block_v=cfg.block_v,
                                                     runs=cfg.runs)
  dq, dk, db = delta_output.query_key_grads(q, k, delta, do, b, states, d_states, doc, scale=cfg.scale,
                                            chunk=cfg.chunk, block_k=cfg.block_k)
  dk_wy, dv, d_beta, db_wy = delta_chunk.wy_grads(k, v, beta, b, m, d_delta, states, doc, chunk=cfg.chunk)
  return dq, (dk + dk_wy).astype(k.dtype), dv, d_beta.astype(beta.dtype), db + db_wy, d_h0, None


_delta_rule.defvjp(_delta_rule_fwd, _delta_rule_bwd)


def _check(key_dim: int, value_dim: int, chunk_size: int) -> None:
  """Raises ValueError, naming the size, unless the head dims are in HEAD_DIMS and the chunk a power of two
  in [MIN_CHUNK, MAX_CHUNK]."""
  for name, size in (("key_dim", key_dim), ("value_dim", value_dim)):
    if size not in HEAD_DIMS:
      raise ValueError(f"impl='pallas' of delta_rule needs {name} in {HEAD_DIMS}, got {size}")
  if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
    raise ValueError(f"impl='pallas' of delta_rule needs chunk_size a power of two from {MIN_CHUNK} to "
                     f"{MAX_CHUNK}, got {chunk_size}")


def supports(key_dim: int, value_dim: int, chunk_size: int) -> bool:
  """Whether `pallas_delta_rule` takes these sizes (see `_check`)."""
  try:
    _check(key_dim, value_dim, chunk_size)
  except ValueError:
    return False
  return True


def _block_v(batch_heads: int, value_dim: int) -> int:
  """Value block of the scans: narrow when wide blocks would give fewer than FEW_PROGRAMS programs."""
  return NARROW_BLOCK_V if batch_heads * value_dim // WIDE_BLOCK_V < FEW_PROGRAMS else WIDE_BLOCK_V


def pallas_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array, *,
                      scale: float, initial_state: jax.Array | None = None,
                      chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
                      segment_ids: jax.Array | None = None,
                      runs: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Chunked delta rule on Pallas kernels; same results as `delta_naive.naive_delta_rule`.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    beta: write strength in [0, 1] [batch, seq, heads].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, 1].
    scale: output scale.
    initial_state: optional [batch, heads, key_dim, value_dim].
    chunk_size: C, a power of two from 16 to 64; any seq works (zero padding at the end, which leaves the state as it
      is: beta = 0 there).
    segment_ids: optional document ids [batch, seq] (linmoe/kernels/segments.py): exact masks in every kernel
      (`delta_segments`); without them the kernels take no document index.
    runs: runs of chunks each scan walks in parallel (a power of two; `delta_scan._split_scan`): a chain of
      about 2 N / runs + runs dependent steps instead of N chunks, for three times the scans' matmul work.
      None: `state.runs_for(N)` if SPLIT_SCANS, else 1 (one walk over every chunk).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.

  Raises:
    ValueError: key_dim or value_dim not in HEAD_DIMS, chunk_size not a power of two from 16 to 64, or runs
      not a power of two.
  """
  batch, seq_len, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  _check(key_dim, value_dim, chunk_size)
  h0 = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim)
  pad = -seq_len % chunk_size
  q, k, v, beta, g = (recurrence._pad_seq(x, pad) for x in (q, k, v, beta, g))
  if runs is None:
    runs = state.runs_for((seq_len + pad) // chunk_size) if SPLIT_SCANS else 1
  state.check_runs(runs, "impl='pallas' of delta_rule")
  cfg = _Config(scale=float(scale), chunk=chunk_size, block_k=min(BLOCK_K, key_dim),
                block_v=_block_v(batch * heads, value_dim), runs=runs)
  doc = recurrence._documents(segment_ids, chunk_size)
  b = recurrence.floored_chunk_cumsum(g, chunk_size, doc)
  o, final_state = _delta_rule(q, k, v, beta[..., None], b, h0, doc, cfg)
  return o[:, :seq_len], final_state
