"""Document boundaries in the delta rule's Pallas kernels: one int32 per token from which a kernel forms the
masks of `linmoe.kernels.segments.ChunkMasks` for its chunk.

The index d of a token counts the documents that start inside its chunk up to and including it (a chunk's first
token counts when it starts a document). So, within a chunk: tokens i and j are in one document iff d_i = d_j;
a token reads the incoming chunk state iff d_i = 0 (the document of the token before the chunk, which owns
the initial state at chunk 0); it writes the outgoing state iff d_i = d_{C-1}, the chunk's last document; and
the incoming state passes through the chunk iff d_{C-1} = 0. Padding at the end continues the last document.
Without segment ids every kernel takes no index (a static variant) and every mask below is None.
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import segments


def doc_index(segment_ids: jax.Array | None, chunk: int, padded_seq: int, heads: int) -> jax.Array | None:
  """The per-chunk document index of every token, [batch, padded_seq, heads, 1] int32 (the same for every
  head, in the layout of the kernels' token blocks); None when segment_ids is None.

  Args:
    segment_ids: document ids [batch, seq] or None.
    chunk: C, dividing padded_seq.
    padded_seq: the kernels' sequence length, seq rounded up to a multiple of C.
    heads: number of heads.
  """
  if segment_ids is None:
    return None
  doc = segments.chunk_documents(segment_ids, chunk).reshape(segment_ids.shape[0], padded_seq, 1, 1)
  return jnp.broadcast_to(doc, (doc.shape[0], padded_seq, heads, 1))


def with_doc(inputs: tuple, doc: jax.Array | None) -> tuple:
  """A kernel's inputs, followed by the document index when there is one."""
  return inputs if doc is None else (*inputs, doc)


def split_refs(refs: tuple, segmented: bool) -> tuple:
  """(index ref or None, the remaining refs) of a kernel whose inputs end with the optional index."""
  return (refs[0], refs[1:]) if segmented else (None, refs)


def reads_prev(doc: jax.Array | None) -> jax.Array | None:
  """[C, 1] bool, the token reads the incoming chunk state."""
  return None if doc is None else doc == 0


def in_last(doc: jax.Array | None, doc_end: jax.Array | None) -> jax.Array | None:
  """[C, 1] bool, the token is in the chunk's last document (doc_end: the index of its last token [1, 1])."""
  return None if doc is None else doc == doc_end


def carries(doc_end: jax.Array | None) -> jax.Array | None:
  """[1, 1] bool, the chunk has no boundary, so the incoming state passes through it."""
  return None if doc_end is None else doc_end == 0


def keep(mask: jax.Array | None, x: jax.Array) -> jax.Array:
  """x where mask (broadcast), 0 elsewhere; x when mask is None."""
  return x if mask is None else jnp.where(mask, x, 0.0)
