"""Document boundaries in the delta rule's Pallas kernels: one int32 per token from which a kernel forms the
masks of `linmoe.kernels.segments.ChunkMasks` for its chunk.

The index d of a token counts the documents that start inside its chunk up to and including it (a chunk's first
token counts when it starts a document). So, within a chunk: tokens i and j are in one document iff d_i = d_j;
a token reads the incoming chunk state iff d_i = 0 (the document of the token before the chunk, which owns
the initial state at chunk 0); it writes the outgoing state iff d_i = d_{C-1}, the chunk's last document; and
the incoming state passes through the chunk iff d_{C-1} = 0. Padding at the end continues the last document.
The index is `segments.chunk_documents` as [batch, T, 1] int32 (`recurrence._documents`), one block of it shared
by the programs of every head (`_tile.document_spec`). Without segment ids every kernel takes no index (a static
variant) and every mask below is None.
"""

import jax
import jax.numpy as jnp


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
  """[C, 1] bool, the token is in the chunk's last document (doc_end: the index of its last token, [1, 1] or a
  scalar)."""
  return None if doc is None else doc == doc_end


def carries(doc_end: jax.Array | None) -> jax.Array | None:
  """bool of doc_end's shape, the chunk has no boundary, so the incoming state passes through it."""
  return None if doc_end is None else doc_end == 0


def keep(mask: jax.Array | None, x: jax.Array) -> jax.Array:
  """x where mask (broadcast), 0 elsewhere; x when mask is None."""
  return x if mask is None else jnp.where(mask, x, 0.0)
