"""Chunked form of the decay recurrence, one function for scalar and vector decay (DESIGN.md section 2).

With chunks of C tokens and `b_i = sum_{j<=i} g_j` inside a chunk:
  o_i   = scale * [(q_i * e^{b_i})^T S_prev + sum_{j<=i} (q_i * e^{b_i - b_j}) . k_j v_j]   (inter + intra)
  S_new = e^{b_C} S_prev + sum_j (k_j * e^{b_C - b_j}) v_j^T
The intra part is one masked [C, C] score matrix per chunk, computed for all chunks at once; only the fp32
states go through the sequential scan over chunks. The log decay has a trailing axis of 1 (scalar decay,
broadcast over key_dim) or key_dim (vector decay); the two differ only in how the intra scores are built.
With segment ids (segments.py) the same formulas hold per document: the intra scores keep the pairs of one
document, q_i reads S_prev only in the document of the token before the chunk, S_new sums the keys of the
chunk's last document only, and keeps e^{b_C} S_prev only if the chunk has no boundary.
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import common, segments

# Log decays are clamped from below here before the cumulative sums. A gate of -1e4 or -inf would otherwise
# make the in-chunk cumsum b huge or infinite, so that b_i - b_j loses all precision or is inf - inf = nan
# (also in the gradients, through the masked branch of the where-before-exp). e^-60 ~ 1e-26 is far below fp32
# resolution, so the clamp changes no result; each clamped token still adds 60 to |b|, which costs about
# ulp(60 * n_clamped) of absolute precision in b_i - b_j (a relative error ~1e-5 for a few per chunk).
LOG_DECAY_FLOOR = -60.0
DEFAULT_CHUNK_SIZE = 64
DEFAULT_SUB_CHUNK_SIZE = 16


def _pairwise_decay(b: jax.Array) -> jax.Array:
  """exp(b_i - b_j) for j <= i and 0 for j > i (masked in the exponent, before exp).

  Args:
    b: cumulative log decay [..., length, heads, decay_dim], finite.

  Returns:
    [..., length (i), length (j), heads, decay_dim] fp32.
  """
  length = b.shape[-3]
  causal = jnp.tril(jnp.ones((length, length), bool))[:, :, None, None]
  diff = b[..., :, None, :, :] - b[..., None, :, :, :]
  return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def _intra_scores_scalar(q: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
  """Causal intra-chunk scores A_ij = (q_i . k_j) e^{b_i - b_j} for scalar decay.

  Args:
    q, k: [chunks, C, heads, key_dim].
    b: cumulative log decay [chunks, C, heads, 1].

  Returns:
    [chunks, C (i), C (j), heads] fp32.
  """
  scores = jnp.einsum("nihk,njhk->nijh", q, k, preferred_element_type=common.STATE_DTYPE)
  return scores * _pairwise_decay(b)[..., 0]


def _intra_scores_vector(q: jax.Array, k: jax.Array, b: jax.Array, sub_chunk_size: int) -> jax.Array:
  """Causal intra-chunk scores A_ij = sum_d q_id k_jd e^{b_id - b_jd} for vector decay, by sub-chunks.

  For i in sub-chunk p and j in an earlier sub-chunk r < p, e^{b_i - b_j} = e^{b_i - b_ref} e^{b_ref - b_j}
  with b_ref the cumsum at the end of sub-chunk p - 1: both exponents are <= 0, so nothing overflows and a
  matmul does the sum over d. Within a sub-chunk the [c, c, key_dim] decays are formed pair by pair.

  Args:
    q, k: [chunks, C, heads, key_dim].
    b: cumulative log decay [chunks, C, heads, key_dim].
    sub_chunk_size: c, dividing C.

  Returns:
    [chunks, C (i), C (j), heads] fp32.
  """
  n_chunks, chunk_size = q.shape[:2]
  n_sub = chunk_size // sub_chunk_size
  q, k, b = (x.reshape(n_chunks, n_sub, sub_chunk_size, *x.shape[2:]) for x in (q, k, b))
  b_end = b[:, :, -1]  # [N, P, H, K]
  # The scores do not depend on b_ref (it cancels), so neither does their gradient: stopping it keeps
  # fp32 rounding from reaching b_ref's tokens (another document's, with segment ids).
  b_ref = jax.lax.stop_gradient(jnp.concatenate([jnp.zeros_like(b_end[:, :1]), b_end[:, :-1]], axis=1))

  # Sub-chunk pairs (p, r) with r < p.
  earlier = jnp.tril(jnp.ones((n_sub, n_sub), bool), k=-1)[:, :, None, None, None]
  q_from_ref = q * jnp.exp(b - b_ref[:, :, None])  # [N, P, c, H, K]
  k_to_ref_exponent = b_ref[:, :, None, None] - b[:, None]  # [N, P, R, c, H, K]
  k_to_ref = k[:, None] * jnp.exp(jnp.where(earlier, k_to_ref_exponent, -jnp.inf))
  off_diag = jnp.einsum("npihk,nprjhk->npirjh", q_from_ref, k_to_ref,
                        preferred_element_type=common.STATE_DTYPE)

  pair_products = q[:, :, :, None] * k[:, :, None] * _pairwise_decay(b)  # [N, P, c, c, H, K]
  diag = jnp.sum(pair_products, axis=-1)
  same_sub = jnp.eye(n_sub, dtype=bool)[:, None, :, None, None]  # [P, 1, R, 1, 1]
  scores = jnp.where(same_sub, diag[:, :, :, None], off_diag)  # [N, P, c, R, c, H]
  return scores.reshape(n_chunks, chunk_size, chunk_size, -1)


def chunk_state_pass(q_decayed: jax.Array, k_decayed: jax.Array, v: jax.Array, b_last: jax.Array,
                     initial_state: jax.Array,
                     carries: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sequential pass of the fp32 memory over chunks, with the inter-chunk outputs (unscaled).

  Args:
    q_decayed: q_i * e^{b_i} [batch, n_chunks, C, heads, key_dim].
    k_decayed: k_j * e^{b_C - b_j} [batch, n_chunks, C, heads, key_dim].
    v: [batch, n_chunks, C, heads, value_dim].
    b_last: total log decay of each chunk [batch, n_chunks, heads, decay_dim].
    initial_state: [batch, heads, key_dim, value_dim] fp32.
    carries: optional [batch, n_chunks] bool; where False the incoming state does not pass through the
      chunk (segments.ChunkMasks.carries).

  Returns:
    Inter-chunk outputs [batch, n_chunks, C, heads, value_dim] fp32, final state [batch, heads, key_dim,
    value_dim] fp32.
  """

  def body(state, chunk):
    q_c, k_c, v_c, decay_c = chunk
    o_c = jnp.einsum("bchk,bhkv->bchv", q_c, state, preferred_element_type=common.STATE_DTYPE)
    update = jnp.einsum("bchk,bchv->bhkv", k_c, v_c, preferred_element_type=common.STATE_DTYPE)
    return decay_c[..., None] * state + update, o_c

  decay = segments.keep(carries, jnp.exp(b_last))
  chunks = tuple(jnp.moveaxis(x, 1, 0) for x in (q_decayed, k_decayed, v, decay))
  final_state, o = jax.lax.scan(body, initial_state, chunks)
  return jnp.moveaxis(o, 0, 1), final_state


def _check_tiling(chunk_size: int, sub_chunk_size: int, vector_decay: bool) -> None:
  """Raises ValueError for a chunk size < 1, or a sub-chunk size not dividing it (vector decay only)."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  if vector_decay and (sub_chunk_size < 1 or chunk_size % sub_chunk_size):
    raise ValueError(
        f"sub_chunk_size must be positive and divide chunk_size={chunk_size}, got {sub_chunk_size}")


def chunked_recurrence(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
                       initial_state: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       sub_chunk_size: int = DEFAULT_SUB_CHUNK_SIZE,
                       segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Chunked decay recurrence; same results as `naive.naive_recurrence`.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    g: log decay (<= 0) [batch, seq, heads, decay_dim]; decay_dim 1 is scalar decay, key_dim vector decay.
    scale: output scale.
    initial_state: optional [batch, heads, key_dim, value_dim].
    chunk_size: C; any seq works (zero padding at the end, which leaves the state unchanged).
    sub_chunk_size: sub-chunk of the vector-decay intra part; must divide C.
    segment_ids: optional document ids [batch, seq]: the intra pairs, the reads of the incoming state and
      the writes of the outgoing one are masked to one document (segments.py).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  batch, seq_len, heads, key_dim = q.shape
  vector_decay = g.shape[-1] != 1
  _check_tiling(chunk_size, sub_chunk_size, vector_decay)
  state = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  masks = segments.chunk_masks(segment_ids, chunk_size)

  q_c, k_c, v_c, g_c = (common.to_chunks(x, chunk_size) for x in (q, k, v, g))
  g_c = jnp.maximum(g_c.astype(common.STATE_DTYPE), LOG_DECAY_FLOOR)
  b = segments.chunk_cumsum(g_c, masks.documents)  # [B, N, C, H, Kg]
  b_last = b[:, :, -1]  # [B, N, H, Kg]

  # The intra part treats every chunk of every sequence alike: one flat chunk axis keeps the arrays' rank
  # low (jaxlib 0.10.2's CPU backend crashes on some rank-7 multiply-reduce fusions, jax-ml/jax#40412).
  q_f, k_f, v_f, b_f = (x.reshape(-1, *x.shape[2:]) for x in (q_c, k_c, v_c, b))
  if vector_decay:
    scores = _intra_scores_vector(q_f, k_f, b_f, sub_chunk_size)
  else:
    scores = _intra_scores_scalar(q_f, k_f, b_f)
  scores = segments.keep(masks.same, scores)
  o_intra = jnp.einsum("nijh,njhv->nihv", scores, v_f, preferred_element_type=common.STATE_DTYPE)
  o_intra = o_intra.reshape(v_c.shape)

  q_decayed = segments.keep(masks.reads_prev, q_c * jnp.exp(b))
  k_decayed = segments.keep(masks.in_last, k_c * jnp.exp(b_last[:, :, None] - b))
  o_inter, final_state = chunk_state_pass(q_decayed, k_decayed, v_c, b_last, state, masks.carries)

  o = common.from_chunks(scale * (o_inter + o_intra), seq_len)
  return o.astype(v.dtype), final_state
