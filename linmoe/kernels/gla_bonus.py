"""GLA with a current-token bonus (RWKV6 / Finch, Peng et al. 2024): the output reads the memory before
the token's decay and update, plus a bonus for the token itself.

Per head: `o_t = scale * q_t^T (S_{t-1} + diag(u_t) k_t v_t^T)`, `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`.

The chunked form is GLA's (chunked.py), unchanged: `q_{t+1}^T S_t` is GLA's output at t for the query
q_{t+1}, so one GLA pass with the queries shifted one token earlier gives every output but the first
(`q_0^T S_init`, one einsum). In chunk terms this is the strict-causal intra part
`sum_{j<i} (q_i * e^{b_{i-1} - b_j}) . k_j v_j` and the inter part `(q_i * e^{b_{i-1}})^T S_prev`; the bonus
`scale * (q_t . (u_t * k_t)) v_t` is elementwise. With segment ids, GLA's pass restarts at each boundary
and the read of the first token of a document (which the shifted query took at the previous token, in the
previous document) is zeroed.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from linmoe.kernels import chunked, common, naive, segments
# By name: the package rebinds `linmoe.kernels.gla` to the op function.
from linmoe.kernels.gla import _check_inputs as _check_gla_inputs

_SEQ_AXES = ("batch", "seq", "heads")
_STEP_AXES = ("batch", "heads")


def _bonus(q: jax.Array, k: jax.Array, v: jax.Array, u: jax.Array, scale: float) -> jax.Array:
  """The current token's term scale * (q . (u * k)) v: [..., key_dim] x3, [..., value_dim] -> fp32."""
  weight = jnp.sum(q.astype(common.STATE_DTYPE) * u * k.astype(common.STATE_DTYPE), -1, keepdims=True)
  return scale * weight * v.astype(common.STATE_DTYPE)


def _bonus_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, u_t: jax.Array,
                state: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """One token (decode step and reference loop body); [batch, heads, dim] inputs, g_t [.., key_dim]."""
  o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state, preferred_element_type=common.STATE_DTYPE)
  o_t = o_t + _bonus(q_t, k_t, v_t, u_t, scale)
  _, state = naive.decay_step(q_t, k_t, v_t, g_t, state, scale)
  return o_t.astype(v_t.dtype), state


def _naive(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, u: jax.Array, *, scale: float,
           initial_state: jax.Array, segment_ids: jax.Array | None = None,
           **tiling: int) -> tuple[jax.Array, jax.Array]:
  """The reference: `jax.lax.scan` of `_bonus_step` over tokens."""
  del tiling  # The token loop has no chunks.
  return naive.scan_tokens(_bonus_step, (q, k, v, g, u), initial_state, scale, segment_ids)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, u: jax.Array, *, scale: float,
             initial_state: jax.Array, segment_ids: jax.Array | None = None,
             **tiling: int) -> tuple[jax.Array, jax.Array]:
  """GLA's chunked form on the queries shifted one token earlier, plus the first output and the bonus."""
  q_next = jnp.concatenate([q[:, 1:], jnp.zeros_like(q[:, :1])], axis=1)
  o_next, final_state = chunked.chunked_recurrence(q_next, k, v, g, scale=scale, initial_state=initial_state,
                                                   segment_ids=segment_ids, **tiling)
  o_first = scale * jnp.einsum("bhk,bhkv->bhv", q[:, 0], initial_state,
                               preferred_element_type=common.STATE_DTYPE)
  o = jnp.concatenate([o_first[:, None], o_next[:, :-1].astype(common.STATE_DTYPE)], axis=1)
  o = segments.keep(segments.continues(segment_ids), o)
  return (o + _bonus(q, k, v, u, scale)).astype(v.dtype), final_state


_IMPLS = {"naive": _naive, "chunked": _chunked}
_AUTO = "chunked"


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, u: jax.Array,
                  state: jax.Array | None, lead_axes: Sequence[str]) -> tuple[jax.Array, jax.Array]:
  """Validates shapes as GLA does, plus u; returns g [*lead, key_dim] and u broadcast to q's shape."""
  g = _check_gla_inputs(q, k, v, g, state, lead_axes, per_key_decay=True)
  if tuple(u.shape) not in (q.shape[-2:], q.shape):
    raise ValueError(f"u must have shape [heads, key_dim] = {tuple(q.shape[-2:])} or "
                     f"[{', '.join(lead_axes)}, key_dim] = {tuple(q.shape)}, got {tuple(u.shape)}")
  return g, jnp.broadcast_to(u, q.shape)


def gla_bonus(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, u: jax.Array, *,
              scale: float | None = None, initial_state: jax.Array | None = None,
              segment_ids: jax.Array | None = None, impl: str = "auto",
              chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
              sub_chunk_size: int = chunked.DEFAULT_SUB_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """GLA whose output reads the memory before the current token, plus the token's bonus u (RWKV6).

  Args:
    q: queries (receptance) [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, key_dim].
    u: bonus [heads, key_dim] (RWKV6's time_first), or one per token [batch, seq, heads, key_dim].
    scale: output scale, default key_dim ** -0.5.
    initial_state: optional memory [batch, heads, key_dim, value_dim], of the first token's document.
    segment_ids: optional document id per token [batch, seq] int32: the memory restarts from zero where
      the id changes (linmoe/kernels/segments.py).
    impl: "naive", "chunked" or "auto".
    chunk_size: chunk length of the chunked form.
    sub_chunk_size: sub-chunk length of the chunked intra part; must divide chunk_size.

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  fn = common.select_impl(_IMPLS, impl, _AUTO, segment_ids)
  g, u = _check_inputs(q, k, v, g, u, initial_state, _SEQ_AXES)
  segments.check(segment_ids, *q.shape[:2])
  batch, _, heads, key_dim = q.shape
  state = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  return fn(q, k, v, g, u, scale=common.default_scale(scale, key_dim), initial_state=state,
            chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)


def gla_bonus_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, u: jax.Array,
                   state: jax.Array, *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode step of `gla_bonus`.

  Args:
    q_t: query [batch, heads, key_dim].
    k_t: key [batch, heads, key_dim].
    v_t: value [batch, heads, value_dim].
    g_t: log decay [batch, heads, key_dim].
    u: bonus [heads, key_dim] or [batch, heads, key_dim].
    state: memory [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new state [batch, heads, key_dim, value_dim] fp32.
  """
  g_t, u = _check_inputs(q_t, k_t, v_t, g_t, u, state, _STEP_AXES)
  return _bonus_step(q_t, k_t, v_t, g_t, u, state.astype(common.STATE_DTYPE),
                     common.default_scale(scale, q_t.shape[-1]))
