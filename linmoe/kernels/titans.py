"""Titans' neural memory, linear form (Behrouz et al. 2025, "Titans: Learning to Memorize at Test Time").

Per head, a linear memory M [key_dim, value_dim] trained online on the loss l(M; k, v) = 1/2 |M^T k - v|^2
(the paper's |.|^2 without the 1/2; the factor 2 goes into theta) by gradient descent with momentum
("surprise") S and forgetting:
  S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; k_t, v_t) = eta_t S_{t-1} + theta_t k_t e_t^T,
  e_t = v_t - M_{t-1}^T k_t,   M_t = (1 - alpha_t) M_{t-1} + S_t,   o_t = scale * M_t^T q_t,
with eta_t = e^{g_momentum_t} and 1 - alpha_t = e^{g_t} given in log space. The state is the pair (M, S).

Which recurrence is exact: every implementation here computes this token-level recurrence, the gradient
of token t taken at M_{t-1}. The paper trains with the gradients of a chunk taken at the chunk-start
memory (mini-batch gradient descent) to parallelise; for a linear memory that approximation is not needed:
the exact recurrence has the chunked form below, so "naive" (scan of the step), "chunked" and the
decode step agree, and nothing depends on the chunk size.

Chunked form. Inside a chunk from (M_0, S_0), with P(i, m) = prod_{m<l<=i} (1 - alpha_l),
H(m, j) = prod_{j<l<=m} eta_l and the errors e_j = v_j - M_{j-1}^T k_j, unrolling gives
  S_i = H(i, 0) S_0 + sum_{j<=i} H(i, j) theta_j k_j e_j^T,
  M_i = P(i, 0) M_0 + c_i S_0 + sum_{j<=i} D_ij theta_j k_j e_j^T,
  D_ij = sum_{j<=m<=i} P(i, m) H(m, j),   c_i = sum_{m<=i} P(i, m) H(m, 0),
so D = Gamma_P Gamma_H is a product of two causal decay matrices. Putting M_{i-1} into e_i gives the
unit lower triangular system (I + L) E = V - (P(i-1, 0) K) M_0 - (c_{i-1} K) S_0 with
L_ij = D_{i-1,j} theta_j (k_i . k_j), solved once per chunk for E = U - W_M M_0 - W_S S_0; the sequential
scan over chunks carries (M, S) and forms E; the intra outputs scale * sum_{j<=i} D_ij theta_j (q_i . k_j)
e_j are batched after it. The chunk-end update reads the row of the chunk's last real token, so the
zero padding of the last chunk never touches the state.

With segment ids (segments.py), Gamma_P and Gamma_H (so D, L and the intra scores) keep the pairs of one
document; P(i, 0), H(i, 0), hence c_i, and the rows of W_M, W_S keep the tokens of the document that owns
(M_0, S_0); the chunk-end row then holds only the keys of the chunk's last document, and (M_0, S_0) pass
through the chunk only if it has no boundary.
"""

import jax
import jax.numpy as jnp
import numpy as np

from linmoe.kernels import chunked, common, naive, segments
from linmoe.kernels.triangular import shift_down, unit_lower_solve

_SEQ_AXES = ("batch", "seq", "heads")
_STEP_AXES = ("batch", "heads")
_GATE_NAMES = ("theta", "g", "g_momentum")
State = tuple[jax.Array, jax.Array]  # (memory M, momentum S), each [batch, heads, key_dim, value_dim] fp32


def titans_token(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, theta_t: jax.Array, g_t: jax.Array,
                 g_momentum_t: jax.Array, state: State, scale: float) -> tuple[jax.Array, State]:
  """One token (decode step and reference loop body): [batch, heads, dim] vectors, [batch, heads] gates."""
  f32 = common.STATE_DTYPE
  memory, momentum = state
  error = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, memory, preferred_element_type=f32)
  write = jnp.einsum("bhk,bhv->bhkv", theta_t.astype(f32)[..., None] * k_t, error)
  gate = lambda x: jnp.exp(x.astype(f32))[..., None, None]
  momentum = gate(g_momentum_t) * momentum + write
  memory = gate(g_t) * memory + momentum
  o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, memory, preferred_element_type=f32)
  return o_t.astype(v_t.dtype), (memory, momentum)


def _naive(q, k, v, theta, g, g_momentum, *, scale, initial_state, segment_ids=None, **tiling):
  """The reference: `jax.lax.scan` of `titans_token` over tokens."""
  del tiling  # The token loop has no chunks.
  return naive.scan_tokens(titans_token, (q, k, v, theta, g, g_momentum), initial_state, scale, segment_ids)


def _chunk_pass(inputs: tuple, state: State) -> tuple[jax.Array, jax.Array, State]:
  """Sequential pass of (M, S) over chunks; inputs' leading axes are [batch, n_chunks] (see _chunked)."""
  f32 = common.STATE_DTYPE
  mm = lambda x, s: jnp.einsum("bchk,bhkv->bchv", x, s, preferred_element_type=f32)
  write = lambda x, e: jnp.einsum("bchk,bchv->bhkv", x, e, preferred_element_type=f32)

  def body(carry, chunk):
    memory, momentum = carry
    q_m, q_s, w_m, w_s, u, key_m, key_s, p_end, c_end, h_end = chunk
    error = u - mm(w_m, memory) - mm(w_s, momentum)
    o = mm(q_m, memory) + mm(q_s, momentum)
    memory = p_end[..., None, None] * memory + c_end[..., None, None] * momentum + write(key_m, error)
    momentum = h_end[..., None, None] * momentum + write(key_s, error)
    return (memory, momentum), (o, error)

  state, (o, error) = jax.lax.scan(body, state, tuple(jnp.moveaxis(x, 1, 0) for x in inputs))
  return jnp.moveaxis(o, 0, 1), jnp.moveaxis(error, 0, 1), state


def _chunked(q, k, v, theta, g, g_momentum, *, scale, initial_state, chunk_size=chunked.DEFAULT_CHUNK_SIZE,
             segment_ids=None):
  """Chunked form (module docstring); same results as `_naive`."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  f32, (batch, seq_len), key_dim = common.STATE_DTYPE, q.shape[:2], q.shape[-1]
  masks = segments.chunk_masks(segment_ids, chunk_size)
  q_c, k_c, v_c, theta_c, g_c, gm_c = (common.to_chunks(x, chunk_size) for x in
                                       (q, k, v, theta, g, g_momentum))
  n_chunks = q_c.shape[1]
  cum_p, cum_h = (segments.chunk_cumsum(jnp.maximum(x.astype(f32), chunked.LOG_DECAY_FLOOR),
                                        masks.documents)[..., None] for x in (g_c, gm_c))  # [B, N, C, H, 1]
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  gamma_p, gamma_h = (segments.keep(masks.same, chunked._pairwise_decay(flat(x))[..., 0])
                      for x in (cum_p, cum_h))  # [n, i, j, H]
  d = jnp.einsum("nimh,nmjh->nijh", gamma_p, gamma_h)
  # P(i, 0), H(i, 0): [n, C, H]
  p0, h0 = (flat(segments.keep(masks.reads_prev, jnp.exp(x[..., 0]))) for x in (cum_p, cum_h))
  c = jnp.einsum("nimh,nmh->nih", gamma_p, h0)

  q_f, k_f, v_f = flat(q_c), flat(k_c), flat(v_c)
  k_theta = k_f * flat(theta_c).astype(f32)[..., None]
  kk = jnp.einsum("nihk,njhk->nijh", k_f, k_theta, preferred_element_type=f32)
  p0_prev = shift_down(p0 - 1.0) + 1.0  # P(i - 1, 0), with P(-1, 0) = 1
  rhs = jnp.concatenate([p0_prev[..., None] * k_f, shift_down(c)[..., None] * k_f, v_f.astype(f32)], -1)
  lower = segments.keep(masks.same, shift_down(d) * kk)  # row i: D_{i-1, j}, a pair of i's document
  w_m, w_s, u = jnp.split(unit_lower_solve(lower, rhs), [key_dim, 2 * key_dim], axis=-1)

  # The chunk-end update reads the row of each chunk's last real token (C - 1 but in the last chunk).
  end = np.minimum(chunk_size - 1, seq_len - 1 - chunk_size * np.arange(n_chunks))
  chunks = lambda x: x.reshape(batch, n_chunks, *x.shape[1:])  # inverse of flat
  at_end = lambda x: chunks(x)[:, np.arange(n_chunks), end]
  key_m, key_s = (at_end(x)[..., None] * chunks(k_theta) for x in (d, gamma_h))
  # The solve is block diagonal by document: W_M, W_S (the (M_0, S_0) terms) are masked per token.
  w_m, w_s = (segments.keep(masks.reads_prev, chunks(x)) for x in (w_m, w_s))
  inputs = (chunks(p0[..., None] * q_f), chunks(c[..., None] * q_f), w_m, w_s, chunks(u),
            key_m, key_s, at_end(p0), at_end(c), at_end(h0))
  o_inter, error, final_state = _chunk_pass(inputs, initial_state)

  scores = d * jnp.einsum("nihk,njhk->nijh", q_f, k_theta, preferred_element_type=f32)
  o_intra = jnp.einsum("nijh,njhv->nihv", scores, flat(error), preferred_element_type=f32)
  o = common.from_chunks(scale * (o_inter + o_intra.reshape(o_inter.shape)), seq_len)
  return o.astype(v.dtype), final_state


_IMPLS = {"naive": _naive, "chunked": _chunked}
_AUTO = "chunked"


def _check_inputs(q, k, v, gates, state, lead_axes) -> None:
  """Validates q, k, v, the per-head gates [*lead] and both parts of the state."""
  common.check_qkv(q, k, v, lead_axes)
  for name, x in zip(_GATE_NAMES, gates):
    common.check_shape(name, x, q.shape[:-1], f"[{', '.join(lead_axes)}]")
  if state is not None:
    expected = (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1])
    if len(state) != 2:
      raise ValueError(f"state must be a pair (memory, momentum), got {len(state)} arrays")
    for part in state:
      common.check_shape("state", part, expected, "[batch, heads, key_dim, value_dim]")


def titans(q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, g: jax.Array, g_momentum: jax.Array,
           *, scale: float | None = None, initial_state: State | None = None,
           segment_ids: jax.Array | None = None, impl: str = "auto",
           chunk_size: int = chunked.DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, State]:
  """Titans' linear memory with momentum and forgetting (module docstring).

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim], normalised by the caller (e.g. L2).
    v: values [batch, seq, heads, value_dim].
    theta: inner learning rate (>= 0) [batch, seq, heads].
    g: log(1 - alpha), the memory's log forget gate (<= 0; -inf allowed) [batch, seq, heads].
    g_momentum: log(eta), the momentum's log decay (<= 0; -inf allowed) [batch, seq, heads].
    scale: output scale, default key_dim ** -0.5.
    initial_state: optional (memory, momentum), each [batch, heads, key_dim, value_dim], of the first
      token's document.
    segment_ids: optional document id per token [batch, seq] int32: memory and momentum restart from zero
      where the id changes (linmoe/kernels/segments.py).
    impl: "naive", "chunked" or "auto".
    chunk_size: chunk length of the chunked form.

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final (memory, momentum), each [batch, heads, key_dim,
    value_dim] fp32.
  """
  fn = common.select_impl(_IMPLS, impl, _AUTO, segment_ids)
  _check_inputs(q, k, v, (theta, g, g_momentum), initial_state, _SEQ_AXES)
  segments.check(segment_ids, *q.shape[:2])
  shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  state = tuple(common.initial_state_or_zeros(s, *shape) for s in (initial_state or (None, None)))
  return fn(q, k, v, theta, g, g_momentum, scale=common.default_scale(scale, q.shape[-1]),
            initial_state=state, chunk_size=chunk_size)


def titans_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, theta_t: jax.Array, g_t: jax.Array,
                g_momentum_t: jax.Array, state: State, *,
                scale: float | None = None) -> tuple[jax.Array, State]:
  """One decode step of `titans`.

  Args:
    q_t, k_t: [batch, heads, key_dim].
    v_t: value [batch, heads, value_dim].
    theta_t, g_t, g_momentum_t: gates [batch, heads] (as in `titans`).
    state: (memory, momentum), each [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new (memory, momentum) fp32.
  """
  _check_inputs(q_t, k_t, v_t, (theta_t, g_t, g_momentum_t), state, _STEP_AXES)
  state = tuple(s.astype(common.STATE_DTYPE) for s in state)
  return titans_token(q_t, k_t, v_t, theta_t, g_t, g_momentum_t, state,
                      common.default_scale(scale, q_t.shape[-1]))
