"""The decay recurrence on Pallas kernels, forward and backward (`jax.custom_vjp`).

Forward: `state.chunk_scan` stores the state entering every chunk, (vector decay) `intra.intra_scores`
the causal intra-chunk scores, and `output.chunk_outputs` the outputs of all chunks in parallel.
Backward: the residuals are the inputs (q, k, v, the cumulative log decay b and the initial state) and the
chunk states (K x V per chunk and head; with K = V = 128 and C = 64: scalar decay in the inputs' dtype, 512
bytes per token and head in bf16; vector decay in fp32, 1024 bytes), which spares the backward a scan (H100,
simple_gla, 8 heads, bf16, forward + backward: 2.57 ms against 2.93 at 1 x 64K, 0.71 against 0.79 at 8 x 2K).
With save_states=False they are recomputed instead (one more scan, no [T / C, K, V] array kept alive from the
forward pass to the backward). Vector decay also keeps its intra-chunk scores ([C] fp32 per token and head,
256 bytes with C = 64), which spares the backward the score kernel; save_states=False recomputes them too.
The reverse scan gives dL/dh at
every chunk edge, then `grads` and (vector decay) `intra.intra_grads` give dv, dq, dk and dL/db per chunk.
The floor and the within-chunk cumulative sum of g stay outside the custom_vjp, so JAX differentiates them.
Segment ids reach every kernel as one int32 per token (`segments.chunk_documents`, computed outside), from which
each kernel masks the pairs, reads and writes of the chunked form exactly as `chunked.py` does (never through
the decay); without them the kernels compile with no mask at all.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from linmoe.kernels import chunked, common, segments
from linmoe.kernels.pallas import grads, intra, output, state

MIN_DIM = 16  # Smallest matmul side of the Triton lowering.
BLOCK = 64  # Key and value block of the programs that split the feature axes.


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call."""
  scale: float
  chunk: int
  sub: int
  block_k: int
  block_v: int
  runs: int | None  # of `state.chunk_scan`, both directions
  save_states: bool


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, h0: jax.Array, docs: jax.Array | None,
             cfg: _Config) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]:
  """(o [batch, T, heads, V], the final state [batch, heads, K, V] fp32) and (the chunk states
  (`state.chunk_scan`), the vector-decay intra-chunk scores or None), T a multiple of the chunk."""
  states, final = state.chunk_scan(k, v, b, h0, chunk=cfg.chunk, reverse=False, factor=1.0,
                                   block_k=cfg.block_k, block_v=cfg.block_v, docs=docs, runs=cfg.runs)
  scores = intra.intra_scores(q, k, b, chunk=cfg.chunk, sub=cfg.sub, docs=docs) if b.shape[-1] > 1 else None
  o = output.chunk_outputs(q, k, v, b, states, scores, scale=cfg.scale, chunk=cfg.chunk, block_v=cfg.block_v,
                           docs=docs)
  return (o, final), (states, scores)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _recurrence(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, h0: jax.Array, docs: jax.Array | None,
                cfg: _Config) -> tuple[jax.Array, jax.Array]:
  return _forward(q, k, v, b, h0, docs, cfg)[0]


def _recurrence_fwd(q, k, v, b, h0, docs, cfg):
  outputs, saved = _forward(q, k, v, b, h0, docs, cfg)
  return outputs, (q, k, v, b, h0, docs, *(saved if cfg.save_states else (None, None)))


def _recurrence_bwd(cfg: _Config, residuals: tuple, cotangents: tuple) -> tuple[jax.Array | None, ...]:
  """Gradients of (q, k, v, b, h0) from the cotangents of (o, final state); None for the documents."""
  q, k, v, b, h0, docs, states, scores = residuals
  do, d_final = cotangents
  do = do.astype(v.dtype)
  vector_decay = b.shape[-1] > 1
  scan = functools.partial(state.chunk_scan, chunk=cfg.chunk, block_k=cfg.block_k, block_v=cfg.block_v,
                           docs=docs, runs=cfg.runs)
  if states is None:  # save_states=False: recomputed.
    states, _ = scan(k, v, b, h0, reverse=False, factor=1.0)
  d_states, d_h0 = scan(q, do, b, d_final.astype(jnp.float32), reverse=True, factor=cfg.scale)
  if vector_decay and scores is None:  # save_states=False: recomputed.
    scores = intra.intra_scores(q, k, b, chunk=cfg.chunk, sub=cfg.sub, docs=docs)
  dv = grads.value_grad(q, k, b, do, d_states, scores, scale=cfg.scale, chunk=cfg.chunk, block_v=cfg.block_v,
                        dtype=v.dtype, docs=docs)
  dq, dk, db = grads.query_key_grads(q, k, v, do, b, states, d_states, scale=cfg.scale, chunk=cfg.chunk,
                                     block_k=cfg.block_k, docs=docs)
  if vector_decay:
    d_scores = grads.score_grads(do, v, scale=cfg.scale, chunk=cfg.chunk, docs=docs)
    dq, dk, db = intra.intra_grads(q, k, b, d_scores, dq, dk, db, chunk=cfg.chunk, sub=cfg.sub)
  return dq, dk, dv, db, d_h0, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _is_tile_size(n: int) -> bool:
  """A power of two of at least MIN_DIM."""
  return n >= MIN_DIM and n & (n - 1) == 0


def supports(key_dim: int, value_dim: int, chunk_size: int, sub_chunk_size: int,
             vector_decay: bool) -> bool:
  """Whether `pallas_recurrence` takes these sizes (see `_check`)."""
  try:
    _check(key_dim, value_dim, chunk_size, sub_chunk_size, vector_decay)
  except ValueError:
    return False
  return True


def _check(key_dim: int, value_dim: int, chunk_size: int, sub_chunk_size: int, vector_decay: bool) -> None:
  """Raises ValueError, naming the size, unless every tiled size is a power of two >= MIN_DIM."""
  sizes = {"key_dim": key_dim, "value_dim": value_dim, "chunk_size": chunk_size}
  if vector_decay:
    sizes["sub_chunk_size"] = sub_chunk_size
  for name, size in sizes.items():
    if not _is_tile_size(size):
      raise ValueError(f"impl='pallas' needs {name} to be a power of two >= {MIN_DIM}, got {size}")
  if vector_decay and sub_chunk_size > chunk_size:
    raise ValueError(f"sub_chunk_size must divide chunk_size={chunk_size}, got {sub_chunk_size}")


def floored_chunk_cumsum(g: jax.Array, chunk_size: int, docs: jax.Array | None) -> jax.Array:
  """Floored log decay summed within each chunk: [batch, T, heads, Kg] -> same, fp32 (T a multiple of C);
  with the kernels' documents docs [batch, T, 1] (`_documents`), no gradient crosses a document boundary
  (segments.chunk_cumsum)."""
  batch, seq_len = g.shape[:2]
  g = jnp.maximum(g.astype(jnp.float32), chunked.LOG_DECAY_FLOOR)
  documents = None if docs is None else docs.reshape(batch, seq_len // chunk_size, chunk_size)
  b = segments.chunk_cumsum(g.reshape(batch, seq_len // chunk_size, chunk_size, *g.shape[2:]), documents)
  return b.reshape(g.shape)


def _pad_seq(x: jax.Array, pad: int) -> jax.Array:
  """Zero-pads the seq axis (1) at the end; x itself when pad is 0."""
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _documents(segment_ids: jax.Array | None, chunk_size: int) -> jax.Array | None:
  """The kernels' documents [batch, T padded, 1] int32 (segments.chunk_documents); None without segment ids."""
  if segment_ids is None:
    return None
  docs = segments.chunk_documents(segment_ids, chunk_size)
  return docs.reshape(docs.shape[0], -1, 1)


def pallas_recurrence(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
                      initial_state: jax.Array | None = None,
                      chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
                      sub_chunk_size: int = chunked.DEFAULT_SUB_CHUNK_SIZE,
                      segment_ids: jax.Array | None = None, runs: int | None = None,
                      save_states: bool = True) -> tuple[jax.Array, jax.Array]:
  """Chunked decay recurrence on Pallas kernels; same results as `naive.naive_recurrence`.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, decay_dim]; decay_dim 1 is scalar decay, key_dim
      vector decay.
    scale: output scale.
    initial_state: optional [batch, heads, key_dim, value_dim].
    chunk_size: C, a power of two >= 16; any seq works (zero padding at the end).
    sub_chunk_size: sub-chunk of the vector-decay intra part, a power of two >= 16 dividing C.
    segment_ids: optional document ids [batch, seq]: the state restarts at each new document (segments.py).
    runs: runs of the split chunk scan, a power of two (`state.chunk_scan`; 1: one walk over every chunk);
      None takes `state.runs_for`.
    save_states: keep the forward's chunk states (and vector decay's intra-chunk scores) for the backward
      (else the backward recomputes them).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.

  Raises:
    ValueError: key_dim, value_dim, chunk_size or sub_chunk_size is not a power of two >= 16.
  """
  batch, seq_len, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  vector_decay = g.shape[-1] != 1
  _check(key_dim, value_dim, chunk_size, sub_chunk_size, vector_decay)
  h0 = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim)
  pad = -seq_len % chunk_size
  q, k, v, g = (_pad_seq(x, pad) for x in (q, k, v, g))
  cfg = _Config(scale=float(scale), chunk=chunk_size, sub=sub_chunk_size, block_k=min(BLOCK, key_dim),
                block_v=min(BLOCK, value_dim), runs=runs, save_states=save_states)
  docs = _documents(segment_ids, chunk_size)
  o, final_state = _recurrence(q, k, v, floored_chunk_cumsum(g, chunk_size, docs), h0, docs, cfg)
  return o[:, :seq_len], final_state
