"""Block specs over the op layouts and small tile functions shared by the kernels.

Every grid is (i, bh, j): `bh` runs over batch * heads, `i` over chunks, sub-chunks or key blocks, and `j` over
feature blocks. Tile functions work on loaded values; all decays are exponents <= 0 masked before `exp`.

With segment ids, a kernel's first input is `docs` [batch, T, 1] int32 (segments.chunk_documents: the documents
started in the chunk up to each token, 0 for the document of the token before the chunk); without them that
ref is None and the kernel compiles without any mask (`with_documents`). The decay scans (`state.py`) take
their masks folded into the exponents instead.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
BlockIndex = Callable[[jax.Array, jax.Array], jax.Array | int]


def token_spec(heads: int, rows: int, width: int, row_block: BlockIndex, col_block: BlockIndex) -> pl.BlockSpec:
  """Block [rows, width] of a [batch, seq, heads, dim] array; the block indices are functions of (i, j)."""
  return pl.BlockSpec((None, rows, None, width),
                      lambda i, bh, j: (bh // heads, row_block(i, j), bh % heads, col_block(i, j)))


def chunk_state_spec(heads: int, n_chunks: int | None, block_k: int, block_v: int, chunk: BlockIndex,
                     k_block: BlockIndex, v_block: BlockIndex) -> pl.BlockSpec:
  """Block [n_chunks, block_k, block_v] of a [batch, N, heads, K, V] array (n_chunks None squeezes that axis)."""
  return pl.BlockSpec((None, n_chunks, None, block_k, block_v),
                      lambda i, bh, j: (bh // heads, chunk(i, j), bh % heads, k_block(i, j), v_block(i, j)))


def head_state_spec(heads: int, block_k: int, block_v: int, k_block: BlockIndex,
                    v_block: BlockIndex) -> pl.BlockSpec:
  """Block [block_k, block_v] of a [batch, heads, K, V] state."""
  return pl.BlockSpec((None, None, block_k, block_v),
                      lambda i, bh, j: (bh // heads, bh % heads, k_block(i, j), v_block(i, j)))


def document_spec(heads: int, rows: int, row_block: BlockIndex) -> pl.BlockSpec:
  """Block [rows, 1] of the [batch, T, 1] documents, for the programs of every head of a batch entry."""
  return pl.BlockSpec((None, rows, 1), lambda i, bh, j: (bh // heads, row_block(i, j), 0))


def with_documents(kernel: Callable[..., None], docs: jax.Array | None,
                   spec: pl.BlockSpec) -> tuple[Callable[..., None], list[pl.BlockSpec], tuple[jax.Array, ...]]:
  """The kernel, the specs and the arguments to put before the others: docs and its spec, or (no segment
  ids) nothing, the kernel's first ref bound to None. (The decay scans pass their masked chunk log decays,
  their only input that exists for packed rows alone.)"""
  if docs is None:
    return functools.partial(kernel, None), [], ()
  return kernel, [spec], (docs,)


def same_document(rows: jax.Array | None, cols: jax.Array | None) -> jax.Array | None:
  """[R, C] bool: token pairs of one document, from the documents of rows [R, 1] and columns [C, 1] of one
  chunk; None without segment ids."""
  return None if rows is None else rows == jnp.transpose(cols)


def both(mask: jax.Array, extra: jax.Array | None) -> jax.Array:
  """mask & extra, or mask when extra is None."""
  return mask if extra is None else mask & extra


def dot(a: jax.Array, b: jax.Array, dtype: jnp.dtype, *, trans_a: bool = False,
        trans_b: bool = False) -> jax.Array:
  """op(a) @ op(b) with operands cast to `dtype` and fp32 accumulation (op transposes when asked).

  Args:
    a: [M, Kc] ([Kc, M] with trans_a).
    b: [Kc, N] ([N, Kc] with trans_b).
    dtype: operand dtype of the matrix units (the inputs' dtype).
    trans_a: contract a's first axis.
    trans_b: contract b's last axis.

  Returns:
    [M, N] fp32.
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, preferred_element_type=F32)


def row_ids(n: int) -> jax.Array:
  """Row indices 0..n-1 as [n, 1] int32."""
  return lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def col_ids(n: int) -> jax.Array:
  """Column indices 0..n-1 as [1, n] int32."""
  return lax.broadcasted_iota(jnp.int32, (1, n), 1)


def causal(n: int) -> jax.Array:
  """i >= j as [n (i), n (j)] bool."""
  return lax.broadcasted_iota(jnp.int32, (n, n), 0) >= lax.broadcasted_iota(jnp.int32, (n, n), 1)


def masked_exp(mask: jax.Array | None, exponent: jax.Array) -> jax.Array:
  """exp(exponent) where mask (everywhere when None), else 0; masked before exp so that no positive exponent
  is formed."""
  return jnp.exp(exponent if mask is None else jnp.where(mask, exponent, -jnp.inf))


def scalar_decay_scores(q: jax.Array, k: jax.Array, b: jax.Array, dtype: jnp.dtype,
                        same: jax.Array | None = None) -> jax.Array:
  """Causal intra-chunk scores (q_i . k_j) e^{b_i - b_j}, j <= i, for scalar decay.

  Args:
    q, k: [C, K].
    b: cumulative log decay [C, 1] fp32.
    dtype: operand dtype of the matmul.
    same: optional [C, C] bool, the pairs of one document (the others score 0).

  Returns:
    [C (i), C (j)] fp32.
  """
  decay = masked_exp(both(causal(q.shape[0]), same), b - jnp.transpose(b))
  return dot(q, k, dtype, trans_b=True) * decay


def sum_to_decay(x: jax.Array, decay_dim: int) -> jax.Array:
  """Gradient of a per-key quantity [R, K] folded onto a decay of trailing size decay_dim (1 or K)."""
  return jnp.sum(x, axis=1, keepdims=True) if decay_dim == 1 else x


def chunk_start(n: jax.Array | int, chunk: int) -> jax.Array | int:
  """First row of chunk n; the alignment hint only on traced indices (Triton's lowering refuses it on ints)."""
  return n * chunk if isinstance(n, int) else pl.multiple_of(n * chunk, chunk)


class ChunkDocs(NamedTuple):
  """A chunk's document index (segments.chunk_documents) as a scan step sees it."""
  index: jax.Array  # [C, 1] int32
  last: jax.Array  # [1, 1] int32, the index of the chunk's last token (0: the incoming state passes through)


def over_chunks(body: Callable[[jax.Array, jax.Array, ChunkDocs | None], jax.Array], init: jax.Array,
                first: jax.Array | int, last: jax.Array | int, n_chunks: int, chunk: int, docs_ref,
                reverse: bool) -> jax.Array:
  """carry = body(n, carry, docs) over scan steps [first, last) (chunk n = step, or N - 1 - step in reverse);
  returns the last carry. docs (None when docs_ref is None; the delta rule's scans pass it, the decay scans
  take their masks folded into their inputs) is loaded one step ahead: the loop's pipelining leaves that load
  out, and waiting for it put a memory round trip into every step of the chain (packed simple_gla rows, when
  its scans still masked per step, 27% slower at 1 x 64K on an H100, 4% with the prefetch; loading two or
  three steps ahead measured no faster). Its `last` is loaded on its own rather than reduced from `index`."""
  chunk_of = lambda step: n_chunks - 1 - step if reverse else step  # noqa: E731

  def load(step):
    if docs_ref is None:
      return None
    start = chunk_start(chunk_of(step), chunk)
    return ChunkDocs(docs_ref[pl.ds(start, chunk), :], docs_ref[pl.ds(start + chunk - 1, 1), :])

  def step_fn(step, carry):
    value, docs = carry
    return body(chunk_of(step), value, docs), load(jnp.minimum(step + 1, last - 1))

  return lax.fori_loop(first, last, step_fn, (init, load(jnp.minimum(first, n_chunks - 1))))[0]
