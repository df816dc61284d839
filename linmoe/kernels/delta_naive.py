"""Token-by-token reference of the (gated) delta rule.

Per head: `S_t = (I - beta_t k_t k_t^T)(e^{g_t} S_{t-1}) + beta_t k_t v_t^T`, `o_t = scale * S_t^T q_t`.
Expanding the product gives `S_t = e^{g_t} S_{t-1} + k_t delta_t^T` with the corrected value
`delta_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t)`: one step of the decay recurrence (`naive.decay_step`) on
delta_t in place of v_t.
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import common, naive


def delta_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, beta_t: jax.Array, g_t: jax.Array,
               state: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """One token of the delta rule (the decode step and the body of the reference loop).

  Args:
    q_t: queries [batch, heads, key_dim].
    k_t: keys [batch, heads, key_dim].
    v_t: values [batch, heads, value_dim].
    beta_t: write strength in [0, 1] [batch, heads].
    g_t: log decay [batch, heads, 1]; exp(-inf) = 0 is allowed.
    state: memory [batch, heads, key_dim, value_dim], fp32.
    scale: output scale.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, and the new fp32 state.
  """
  decay = jnp.exp(g_t.astype(common.STATE_DTYPE))  # [B, H, 1]
  recalled = jnp.einsum("bhk,bhkv->bhv", k_t, state, preferred_element_type=common.STATE_DTYPE)
  delta = beta_t.astype(common.STATE_DTYPE)[..., None] * (v_t - decay * recalled)
  o_t, state = naive.decay_step(q_t, k_t, delta, g_t, state, scale)
  return o_t.astype(v_t.dtype), state


def naive_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array, *,
                     scale: float, initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The reference: `jax.lax.scan` of `delta_step` over tokens.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    beta: write strength in [0, 1] [batch, seq, heads].
    g: log decay [batch, seq, heads, 1].
    scale: output scale.
    initial_state: optional [batch, heads, key_dim, value_dim].
    segment_ids: optional document ids [batch, seq]; the state is zeroed at each boundary (segments.py).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  batch, _, heads, key_dim = q.shape
  state = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  return naive.scan_tokens(delta_step, (q, k, v, beta, g), state, scale, segment_ids)
