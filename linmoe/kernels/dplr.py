"""Generalized delta rule with a diagonal-plus-low-rank transition (RWKV7 / Goose, Peng et al. 2025).

Per head, with the memory S [key_dim, value_dim] (flash-linear-attention's `generalized_delta_rule/dplr`):
  S_t = (diag(e^{g_t}) + b_t a_t^T) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t.
RWKV7 takes a = -kappa_hat, b = kappa_hat * a_iclr; the gated delta rule is a = e^{g} k, b = -beta k.

Chunked form (the WY idea of delta_chunked.py with per-channel decay). Write u_t = S_{t-1}^T a_t; then
S_t = e^{g_t} * S_{t-1} + k_t v_t^T + b_t u_t^T is GLA's recurrence with two writes per token. Inside a chunk
from S_prev, with B_i = sum_{j<=i} g_j (a vector) and B_{-1} = 0:
  u_i = (a_i * e^{B_{i-1}})^T S_prev + sum_{j<i} [a_i . (e^{B_{i-1} - B_j} * k_j)] v_j + [.. b_j ..] u_j,
i.e. (I - A_ab) U = (a * e^{B_{i-1}}) S_prev + A_ak V, so U = W S_prev + U~ with one unit lower triangular
solve per chunk. A_ak, A_ab are GLA's intra-chunk scores of the queries a_{i+1} (at B_i) shifted down one
row; with A_qk, A_qb the scores of q, all four come from one `chunked._intra_scores_vector` call. Then
  o     = scale * [(q * e^B) S_prev + A_qk V + A_qb U],
  S_new = e^{B_C} * S_prev + (k * e^{B_C - B})^T V + (b * e^{B_C - B})^T U,
which is `delta_chunked.delta_chunk_pass` on 2C rows (keys [k; b], values [V; U], W = [0; -W]). Padding
(all inputs zero) leaves the state unchanged. With segment ids (segments.py) the four score matrices keep
the pairs of one document, W and the inter outputs the tokens of the document that owns S_prev, and
S_new the keys of the chunk's last document, plus S_prev if the chunk has no boundary.
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import chunked, common, delta_chunked, naive, segments
from linmoe.kernels.triangular import shift_down, unit_lower_solve

_SEQ_AXES = ("batch", "seq", "heads")
_STEP_AXES = ("batch", "heads")
_VECTOR_NAMES = ("a", "b", "g")


def dplr_token(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, a_t: jax.Array, b_t: jax.Array,
               g_t: jax.Array, state: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """One token (the decode step and the body of the reference loop); [batch, heads, dim] inputs."""
  f32 = common.STATE_DTYPE
  read = jnp.einsum("bhk,bhkv->bhv", a_t, state, preferred_element_type=f32)
  state = (jnp.exp(g_t.astype(f32))[..., None] * state
           + jnp.einsum("bhk,bhv->bhkv", b_t.astype(f32), read)
           + jnp.einsum("bhk,bhv->bhkv", k_t, v_t, preferred_element_type=f32))
  o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state, preferred_element_type=f32)
  return o_t.astype(v_t.dtype), state


def _naive(q, k, v, a, b, g, *, scale, initial_state, segment_ids=None, **tiling):
  """The reference: `jax.lax.scan` of `dplr_token` over tokens."""
  del tiling  # The token loop has no chunks.
  return naive.scan_tokens(dplr_token, (q, k, v, a, b, g), initial_state, scale, segment_ids)


def _chunked(q, k, v, a, b, g, *, scale, initial_state, chunk_size=chunked.DEFAULT_CHUNK_SIZE,
             sub_chunk_size=chunked.DEFAULT_SUB_CHUNK_SIZE, segment_ids=None):
  """Chunked form (module docstring); same results as `_naive`."""
  chunked._check_tiling(chunk_size, sub_chunk_size, vector_decay=True)
  f32, seq_len, heads = common.STATE_DTYPE, q.shape[1], q.shape[2]
  masks = segments.chunk_masks(segment_ids, chunk_size)
  q_c, k_c, v_c, a_c, b_c, g_c = (common.to_chunks(x, chunk_size) for x in (q, k, v, a, b, g))
  # B_i, the cumulative log decay inside each chunk: [batch, n_chunks, C, heads, key_dim].
  cum = segments.chunk_cumsum(jnp.maximum(g_c.astype(f32), chunked.LOG_DECAY_FLOOR), masks.documents)
  cum_last = cum[:, :, -1]

  # Per-chunk work on one flat chunk axis (low rank, as in chunked.py).
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  q_f, k_f, v_f, a_f, b_f, cum_f = (flat(x) for x in (q_c, k_c, v_c, a_c, b_c, cum))
  a_next = jnp.concatenate([a_f[:, 1:], jnp.zeros_like(a_f[:, :1])], axis=1)  # row i holds a_{i+1}
  scores = chunked._intra_scores_vector(
      jnp.concatenate([q_f, q_f, a_next, a_next], axis=2), jnp.concatenate([k_f, b_f, k_f, b_f], axis=2),
      jnp.concatenate([cum_f] * 4, axis=2), sub_chunk_size)  # [n, C, C, 4H]
  qk, qb, ak, ab = (scores[..., i * heads:(i + 1) * heads] for i in range(4))
  # After the shift, row i of ak, ab scores a_i against j < i: all four are masked as pairs (i, j).
  qk, qb, ak, ab = (segments.keep(masks.same, x) for x in (qk, qb, shift_down(ak), shift_down(ab)))

  rhs = jnp.concatenate([a_f * jnp.exp(shift_down(cum_f)),
                         jnp.einsum("nijh,njhv->nihv", ak, v_f, preferred_element_type=f32)], axis=-1)
  w_u = unit_lower_solve(-ab, rhs).reshape(*k_c.shape[:2], *rhs.shape[1:])
  w, u = w_u[..., :q.shape[-1]], w_u[..., q.shape[-1]:]
  w = segments.keep(masks.reads_prev, w)  # the solve is block diagonal by document: W masked per token

  decay_to_end = segments.keep(masks.in_last, jnp.exp(cum_last[:, :, None] - cum))
  keys = jnp.concatenate([k_c * decay_to_end, b_c * decay_to_end], axis=2)  # [B, N, 2C, H, K]
  o_inter, values, final_state = delta_chunked.delta_chunk_pass(
      segments.keep(masks.reads_prev, q_c * jnp.exp(cum)), keys,
      jnp.concatenate([jnp.zeros_like(w), -w], axis=2), jnp.concatenate([v_c.astype(f32), u], axis=2),
      cum_last, initial_state, masks.carries)  # values: [V; U]

  o_intra = jnp.einsum("nijh,njhv->nihv", jnp.concatenate([qk, qb], axis=2), flat(values),
                       preferred_element_type=f32)
  o = common.from_chunks(scale * (o_inter + o_intra.reshape(o_inter.shape)), seq_len)
  return o.astype(v.dtype), final_state


_IMPLS = {"naive": _naive, "chunked": _chunked}
_AUTO = "chunked"


def _check_inputs(q, k, v, vectors, state, lead_axes) -> None:
  """Validates q, k, v, the per-key inputs a, b, g (as q) and the state."""
  common.check_qkv(q, k, v, lead_axes)
  layout = f"[{', '.join(lead_axes)}, key_dim]"
  for name, x in zip(_VECTOR_NAMES, vectors):
    common.check_shape(name, x, q.shape, layout)
  if state is not None:
    common.check_shape("state", state, (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]),
                       "[batch, heads, key_dim, value_dim]")


def dplr(q: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array, b: jax.Array, g: jax.Array, *,
         scale: float | None = None, initial_state: jax.Array | None = None,
         segment_ids: jax.Array | None = None, impl: str = "auto",
         chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
         sub_chunk_size: int = chunked.DEFAULT_SUB_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """S_t = (diag(e^{g_t}) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    a: the low-rank read vector [batch, seq, heads, key_dim].
    b: the low-rank write vector [batch, seq, heads, key_dim].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, key_dim].
    scale: output scale, default key_dim ** -0.5.
    initial_state: optional memory [batch, heads, key_dim, value_dim], of the first token's document.
    segment_ids: optional document id per token [batch, seq] int32: the memory restarts from zero where
      the id changes (linmoe/kernels/segments.py).
    impl: "naive", "chunked" or "auto".
    chunk_size: chunk length of the chunked form.
    sub_chunk_size: sub-chunk length of its intra part; must divide chunk_size.

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  fn = common.select_impl(_IMPLS, impl, _AUTO, segment_ids)
  _check_inputs(q, k, v, (a, b, g), initial_state, _SEQ_AXES)
  segments.check(segment_ids, *q.shape[:2])
  state = common.initial_state_or_zeros(initial_state, q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  return fn(q, k, v, a, b, g, scale=common.default_scale(scale, q.shape[-1]), initial_state=state,
            chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)


def dplr_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, a_t: jax.Array, b_t: jax.Array,
              g_t: jax.Array, state: jax.Array, *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode step of `dplr`.

  Args:
    q_t, k_t, a_t, b_t, g_t: [batch, heads, key_dim] (g_t: log decay).
    v_t: value [batch, heads, value_dim].
    state: memory [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new state [batch, heads, key_dim, value_dim] fp32.
  """
  _check_inputs(q_t, k_t, v_t, (a_t, b_t, g_t), state, _STEP_AXES)
  return dplr_token(q_t, k_t, v_t, a_t, b_t, g_t, state.astype(common.STATE_DTYPE),
                    common.default_scale(scale, q_t.shape[-1]))
