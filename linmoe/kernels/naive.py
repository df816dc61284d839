"""Token-by-token reference of the decay recurrence (scalar and vector decay share it).

Per head: `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`, with the log decay g_t of
trailing size 1 (one decay per head, broadcast over key_dim) or key_dim (one per key channel).
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import common, segments


def decay_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, state: jax.Array,
               scale: float) -> tuple[jax.Array, jax.Array]:
  """One token of the recurrence (the decode step and the body of the reference loop).

  Args:
    q_t: queries [batch, heads, key_dim].
    k_t: keys [batch, heads, key_dim].
    v_t: values [batch, heads, value_dim].
    g_t: log decay [batch, heads, decay_dim], decay_dim in {1, key_dim}; exp(-inf) = 0 is allowed.
    state: memory [batch, heads, key_dim, value_dim], fp32.
    scale: output scale.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, and the new fp32 state.
  """
  decay = jnp.exp(g_t.astype(common.STATE_DTYPE))[..., None]  # [B, H, Kg, 1]
  update = jnp.einsum("bhk,bhv->bhkv", k_t, v_t, preferred_element_type=common.STATE_DTYPE)
  state = decay * state + update
  o_t = jnp.einsum("bhk,bhkv->bhv", q_t, state, preferred_element_type=common.STATE_DTYPE)
  return (scale * o_t).astype(v_t.dtype), state


def naive_recurrence(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
                     initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The reference: `jax.lax.scan` of `decay_step` over tokens.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    g: log decay [batch, seq, heads, decay_dim], decay_dim in {1, key_dim}.
    scale: output scale.
    initial_state: optional [batch, heads, key_dim, value_dim].
    segment_ids: optional document ids [batch, seq] (segments.py).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  batch, _, heads, key_dim = q.shape
  state = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  return scan_tokens(decay_step, (q, k, v, g), state, scale, segment_ids)


def scan_tokens(step, inputs: tuple[jax.Array, ...], state, scale: float,
                segment_ids: jax.Array | None = None):
  """`jax.lax.scan` of `step(*inputs_t, state, scale) -> (o_t, state)` over the seq axis (1) of every
  input; returns o [batch, seq, ...] and the final state. The body of every token-loop reference.

  With segment_ids [batch, seq], the carried state (any pytree of [batch, ...] arrays) is zeroed before
  the first token of every new document.
  """
  continues = segments.continues(segment_ids)

  def body(state, token):
    if continues is not None:
      *token, continues_t = token
      state = segments.reset_state(state, continues_t)
    o_t, state = step(*token, state, scale)
    return state, o_t

  tokens = inputs if continues is None else (*inputs, continues)
  final_state, o = jax.lax.scan(body, state, tuple(jnp.moveaxis(x, 1, 0) for x in tokens))
  return jnp.moveaxis(o, 0, 1), final_state
