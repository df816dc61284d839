"""Chunked form of the (gated) delta rule with the WY / UT representation (DESIGN.md section 2).

Derivation (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length";
Yang et al. 2025, "Gated Delta Networks" for the gate). As in `delta_naive`, one token is
`S_t = e^{g_t} S_{t-1} + k_t delta_t^T` with `delta_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t)`. Inside a chunk
starting from S_prev, with `b_i = sum_{j<=i} g_j`, unrolling gives
  S_i = e^{b_i} S_prev + sum_{j<=i} e^{b_i - b_j} k_j delta_j^T,
and putting S_{i-1} into delta_i:
  delta_i + beta_i sum_{j<i} (k_i . k_j) e^{b_i - b_j} delta_j = beta_i (v_i - e^{b_i} S_prev^T k_i).
In matrix form, rows of the chunk, `A = I + tril(diag(beta) (K K^T * Gamma), -1)` with
`Gamma_ij = e^{b_i - b_j}` (unit lower triangular) and `T = A^{-1} diag(beta)`:
  Delta = T V - T (K * e^b) S_prev = U - W S_prev,
  o     = scale * [(Q * e^b) S_prev + (Q K^T * Gamma * causal) Delta]     (inter + intra),
  S_new = e^{b_C} S_prev + (K * e^{b_C - b})^T Delta.
This is the chunked decay recurrence on the values Delta, which depend on S_prev through W only. W and U
come from one triangular solve per chunk, batched over all chunks; the sequential scan over chunks carries
the fp32 state and forms Delta; the intra outputs are then batched again. Padding (k = v = q = 0, beta = 0,
g = 0) gives Delta = 0 and leaves the state unchanged.

With segment ids (segments.py) the same equations hold per document: A and the intra scores keep only the
pairs of one document, the S_prev terms (the rows of W, the inter outputs) only the tokens of the document
that owns S_prev, and S_new only the keys of the chunk's last document, plus S_prev if the chunk has no
boundary.
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import chunked, common, segments
from linmoe.kernels.triangular import unit_lower_solve


def _check_chunk_size(chunk_size: int) -> None:
  """Raises ValueError for a chunk size < 1."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def wy_factors(k: jax.Array, v: jax.Array, beta: jax.Array, b: jax.Array,
               same: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """W = T (K * e^b) and U = T V of every chunk, with T = A^{-1} diag(beta) (module docstring).

  Args:
    k: keys [chunks, C, heads, key_dim].
    v: values [chunks, C, heads, value_dim].
    beta: write strength [chunks, C, heads].
    b: cumulative log decay [chunks, C, heads, 1] fp32, finite.
    same: optional [chunks, C, C] bool, the pairs of one document (segments.ChunkMasks.same); T is then
      block diagonal by document.

  Returns:
    W [chunks, C, heads, key_dim] and U [chunks, C, heads, value_dim], fp32.
  """
  chunk_size, key_dim = k.shape[1], k.shape[-1]
  beta = beta.astype(common.STATE_DTYPE)
  # (k_i . k_j) e^{b_i - b_j} for j <= i, zero above the diagonal; only j < i enters A.
  key_scores = segments.keep(same, chunked._intra_scores_scalar(k, k, b))
  strictly_lower = jnp.tril(jnp.ones((chunk_size, chunk_size), bool), -1)[:, :, None]
  a = jnp.eye(chunk_size)[:, :, None] + jnp.where(strictly_lower, beta[:, :, None] * key_scores, 0.0)
  rhs = beta[..., None] * jnp.concatenate([k * jnp.exp(b), v.astype(common.STATE_DTYPE)], axis=-1)
  wu = unit_lower_solve(a, rhs)  # [N, C, H, key_dim + value_dim]
  return wu[..., :key_dim], wu[..., key_dim:]


def delta_chunk_pass(q_decayed: jax.Array, k_decayed: jax.Array, w: jax.Array, u: jax.Array,
                     b_last: jax.Array, initial_state: jax.Array,
                     carries: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sequential pass of the fp32 memory over chunks: the corrected values and the inter-chunk outputs.

  Args:
    q_decayed: q_i * e^{b_i} [batch, n_chunks, C, heads, key_dim].
    k_decayed: k_j * e^{b_C - b_j} [batch, n_chunks, C, heads, key_dim].
    w: W = T (K * e^b) [batch, n_chunks, C, heads, key_dim] fp32.
    u: U = T V [batch, n_chunks, C, heads, value_dim] fp32.
    b_last: total log decay of each chunk [batch, n_chunks, heads, 1].
    initial_state: [batch, heads, key_dim, value_dim] fp32.
    carries: optional [batch, n_chunks] bool; where False the incoming state does not pass through the
      chunk (segments.ChunkMasks.carries).

  Returns:
    Inter-chunk outputs (unscaled) [batch, n_chunks, C, heads, value_dim] fp32, corrected values
    Delta = U - W S_prev [batch, n_chunks, C, heads, value_dim] fp32, final state [batch, heads, key_dim,
    value_dim] fp32.
  """

  def body(state, chunk):
    q_c, k_c, w_c, u_c, decay_c = chunk
    delta = u_c - jnp.einsum("bchk,bhkv->bchv", w_c, state, preferred_element_type=common.STATE_DTYPE)
    o_c = jnp.einsum("bchk,bhkv->bchv", q_c, state, preferred_element_type=common.STATE_DTYPE)
    update = jnp.einsum("bchk,bchv->bhkv", k_c, delta, preferred_element_type=common.STATE_DTYPE)
    return decay_c[..., None] * state + update, (o_c, delta)

  decay = segments.keep(carries, jnp.exp(b_last))
  chunks = tuple(jnp.moveaxis(x, 1, 0) for x in (q_decayed, k_decayed, w, u, decay))
  final_state, (o, delta) = jax.lax.scan(body, initial_state, chunks)
  return jnp.moveaxis(o, 0, 1), jnp.moveaxis(delta, 0, 1), final_state


def chunked_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array, *,
                       scale: float, initial_state: jax.Array | None = None,
                       chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
                       segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Chunked delta rule; same results as `delta_naive.naive_delta_rule`.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    beta: write strength in [0, 1] [batch, seq, heads].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, 1].
    scale: output scale.
    initial_state: optional [batch, heads, key_dim, value_dim].
    chunk_size: C; any seq works (zero padding at the end, which leaves the state unchanged).
    segment_ids: optional document ids [batch, seq] (module docstring, segments.py).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  _check_chunk_size(chunk_size)
  batch, seq_len, heads, key_dim = q.shape
  state = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  masks = segments.chunk_masks(segment_ids, chunk_size)

  q_c, k_c, v_c, beta_c, g_c = (common.to_chunks(x, chunk_size) for x in (q, k, v, beta, g))
  g_c = jnp.maximum(g_c.astype(common.STATE_DTYPE), chunked.LOG_DECAY_FLOOR)
  # The barrier keeps the cumsum out of its consumers' fusions: XLA GPU (jaxlib 0.11.2) fails to compile a
  # transpose fusion that holds it ("Failed to translate module to LLVM IR", seen at seq 1, chunk_size 16).
  b = jax.lax.optimization_barrier(segments.chunk_cumsum(g_c, masks.documents))  # [B, N, C, H, 1]
  b_last = b[:, :, -1]  # [B, N, H, 1]

  # Per-chunk work on one flat chunk axis (low rank, as in chunked.py).
  q_f, k_f, v_f, beta_f, b_f = (x.reshape(-1, *x.shape[2:]) for x in (q_c, k_c, v_c, beta_c, b))
  w, u = (x.reshape(*k_c.shape[:2], *x.shape[1:]) for x in wy_factors(k_f, v_f, beta_f, b_f, masks.same))
  # T is block diagonal by document, so W's rows (the S_prev terms) are masked per token.
  w = segments.keep(masks.reads_prev, w)

  q_decayed = segments.keep(masks.reads_prev, q_c * jnp.exp(b))
  k_decayed = segments.keep(masks.in_last, k_c * jnp.exp(b_last[:, :, None] - b))
  o_inter, delta, final_state = delta_chunk_pass(q_decayed, k_decayed, w, u, b_last, state, masks.carries)

  scores = segments.keep(masks.same, chunked._intra_scores_scalar(q_f, k_f, b_f))
  o_intra = jnp.einsum("nijh,njhv->nihv", scores, delta.reshape(-1, *delta.shape[2:]),
                       preferred_element_type=common.STATE_DTYPE)
  o = common.from_chunks(scale * (o_inter + o_intra.reshape(delta.shape)), seq_len)
  return o.astype(v.dtype), final_state
