"""Document boundaries in the recurrence ops: segment ids, and the masks that restart the state.

Every op's sequence form takes `segment_ids: [batch, seq] int32 | None`, a document id per token (None: the
row is one document). A new document starts wherever the id changes from the previous token (ids are
expected non-decreasing, as a packer emits them); the memory restarts from zero at its first token, and no
information crosses a boundary, in outputs, final state or gradients. `initial_state` belongs to the
document of the row's first token (what LASP-2's shards and chunked prefill need); the final state is that
of the row's last document.

Why segment ids rather than cu_seqlens (flash-linear-attention packs documents into one flattened row of
the batch and marks them by cumulative lengths): under jit every array has a fixed shape, and per-row ids
keep the [batch, seq] layout of the rest of the model (one packed row per batch entry, any number of
documents per row, no host-side re-layout, batch sharding unchanged), where cu_seqlens has one length per
batch that changes with the number of documents.

The resets are exact masks, never an extreme gate: the token loop zeroes the carried state at a boundary;
the chunked forms mask the intra-chunk pairs of different documents, let a token read the incoming chunk
state only if it is in the document of the token before the chunk, carry the state through a chunk only if
the chunk has no boundary, and sum into the chunk's outgoing state only the keys of its last document.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from linmoe.kernels import common


def check(segment_ids: jax.Array | None, batch: int, seq_len: int) -> None:
  """Raises ValueError unless segment_ids is None or an integer array [batch, seq]."""
  if segment_ids is None:
    return
  common.check_shape("segment_ids", segment_ids, (batch, seq_len), "[batch, seq]")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")


def continues(segment_ids: jax.Array | None) -> jax.Array | None:
  """[batch, seq] bool: token t is in the document of token t - 1 (always True at t = 0, which continues
  the initial state's document); None when segment_ids is None."""
  if segment_ids is None:
    return None
  same = segment_ids[:, 1:] == segment_ids[:, :-1]
  return jnp.concatenate([jnp.ones_like(same[:, :1]), same], axis=1)


def keep(mask: jax.Array | None, x: jax.Array) -> jax.Array:
  """x where mask, 0 elsewhere (a select, so no gradient reaches the masked entries); x when mask is None.

  Args:
    mask: bool [*lead] whose axes are x's leading axes, or None.
    x: [*lead, ...].
  """
  if mask is None:
    return x
  return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x, jnp.zeros((), x.dtype))


def reset_state(state, continues_t: jax.Array):
  """The token loop's reset: every array of the state pytree ([batch, ...]) zeroed in the rows whose
  token starts a new document (continues_t [batch] False)."""
  return jax.tree.map(lambda s: keep(continues_t, s), state)


class ChunkMasks(NamedTuple):
  """Where the chunked forms may mix tokens, for chunks of C tokens ([batch, n_chunks, C] layout; padding at
  the end continues the last document). Every field is None without segment ids.

  same: [batch * n_chunks, C (i), C (j)], tokens i and j in one document (the flat chunk axis of the intra
    parts).
  reads_prev: [batch, n_chunks, C], the token is in the document of the token before the chunk, so it reads
    the incoming chunk state (chunk 0: the first token's document, which owns the initial state).
  in_last: [batch, n_chunks, C], the token is in the chunk's last document, so it writes the outgoing state.
  carries: [batch, n_chunks], the chunk has no boundary, so the incoming state passes through it.
  continues: [batch, n_chunks, C], as `continues`, with the token before the chunk for i = 0.
  documents: [batch, n_chunks, C] int32, `chunk_documents`.
  """
  same: jax.Array | None = None
  reads_prev: jax.Array | None = None
  in_last: jax.Array | None = None
  carries: jax.Array | None = None
  continues: jax.Array | None = None
  documents: jax.Array | None = None


def chunk_documents(segment_ids: jax.Array, chunk_size: int) -> jax.Array:
  """[batch, n_chunks, C] int32: the number of documents started in the chunk up to and including each
  token, so 0 for the tokens in the document of the token before the chunk (chunk 0: of the first token,
  which owns the initial state). Padding at the end of segment_ids [batch, seq] continues the last document.
  """
  # A sum within each chunk only: no pass over the whole row (a long cumsum is slow on GPUs).
  starts = common.to_chunks(~continues(segment_ids), chunk_size)  # zero padding: no start
  return jnp.cumsum(starts, axis=2, dtype=jnp.int32)


def chunk_masks(segment_ids: jax.Array | None, chunk_size: int) -> ChunkMasks:
  """The masks of the chunked forms (ChunkMasks) for segment_ids [batch, seq]; all None when None."""
  if segment_ids is None:
    return ChunkMasks()
  doc = chunk_documents(segment_ids, chunk_size)
  last = doc[:, :, -1]
  before = jnp.concatenate([jnp.zeros_like(doc[:, :, :1]), doc[:, :, :-1]], axis=2)
  same = doc[:, :, :, None] == doc[:, :, None, :]
  return ChunkMasks(same=same.reshape(-1, chunk_size, chunk_size), reads_prev=doc == 0,
                    in_last=doc == last[:, :, None], carries=last == 0, continues=doc == before,
                    documents=doc)


def chunk_cumsum(g_c: jax.Array, documents: jax.Array | None) -> jax.Array:
  """The in-chunk cumulative sum of g_c [batch, n_chunks, C, ...] over axis 2, whose gradient never
  crosses a document boundary (documents [batch, n_chunks, C] int32, `chunk_documents`); the plain cumsum
  when documents is None.

  With documents the values are the plain cumsum's (so b stays non-increasing through the chunk, as the
  sub-chunk factorisations need), but the gradient is that of the sum restarted at each document: the plain
  cumsum's gradient into an earlier document is a sum of terms that cancel in exact arithmetic only, which
  leaves fp32 rounding (~1e-7 relative) where the documents must have none.
  """
  b = jnp.cumsum(g_c, axis=2)
  return b if documents is None else _cumsum_restarted_grad(g_c, documents)


@jax.custom_vjp
def _cumsum_restarted_grad(g_c: jax.Array, documents: jax.Array) -> jax.Array:
  """jnp.cumsum(g_c, axis=2) with the gradient of the sum restarted at each document."""
  del documents
  return jnp.cumsum(g_c, axis=2)


def _cumsum_restarted_grad_fwd(g_c: jax.Array, documents: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.cumsum(g_c, axis=2), documents


def _cumsum_restarted_grad_bwd(documents: jax.Array, d_b: jax.Array) -> tuple[jax.Array, None]:
  """dL/dg_i = sum over t >= i in i's document of dL/db_t: one product with the [C, C] mask "earlier or same
  token, same document" per chunk (exact zeros across documents; fp32 at full precision), where a segmented
  scan took about 2 log2(C) passes of small XLA kernels. The mask is formed here from the [C] document
  index, the residual (C times smaller than the mask)."""
  chunk = d_b.shape[2]
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  within = ((documents[..., :, None] == documents[..., None, :]) & causal).astype(d_b.dtype)  # [B, N, t, i]
  return jnp.einsum("bnti,bnt...->bni...", within, d_b, precision=jax.lax.Precision.HIGHEST), None


_cumsum_restarted_grad.defvjp(_cumsum_restarted_grad_fwd, _cumsum_restarted_grad_bwd)
