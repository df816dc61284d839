"""Diagonal state-space recurrence (S4D, Mamba): a decay per state entry, applied elementwise.

Per head, with state size K and channels V, the memory S_t in R^{K x V} (fp32) follows
  S_t = exp(G_t) * S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t,
where the log decay G_t <= 0 has the full state shape [K, V] (Mamba: G_t[n, d] = dt_t[d] A[d, n],
k_t = B_t, v_t = dt_t * x_t, q_t = C_t). No two entries of S mix, so the recurrence is an elementwise
linear recurrence: "scan" runs `jax.lax.associative_scan` inside chunks of C tokens and carries the state
from chunk to chunk with `jax.lax.scan`. The backward pass of a chunk is the same recurrence run backwards
in time (one reverse associative scan, a custom VJP: 2-3x faster than differentiating the scan), and each
chunk is rematerialized there, so memory holds the [K, V] states of one chunk plus one per chunk.
With segment ids, the affine map of a document's first token is S -> update (its decay multiplier is
masked to exactly 0 by a select, not by a gate value), so the scan restarts there in both directions.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from linmoe.kernels import common, naive, segments

DEFAULT_CHUNK_SIZE = 64
_SEQ_AXES = ("batch", "seq", "heads")
_STEP_AXES = ("batch", "heads")


def _step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, state: jax.Array,
          scale: float) -> tuple[jax.Array, jax.Array]:
  """One token: q_t, k_t [batch, heads, K], v_t [batch, heads, V], g_t and state [batch, heads, K, V]."""
  update = jnp.einsum("bhk,bhv->bhkv", k_t, v_t, preferred_element_type=common.STATE_DTYPE)
  state = jnp.exp(g_t.astype(common.STATE_DTYPE)) * state + update
  o_t = jnp.einsum("bhk,bhkv->bhv", q_t, state, preferred_element_type=common.STATE_DTYPE)
  return (scale * o_t).astype(v_t.dtype), state


def _naive(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
           initial_state: jax.Array, chunk_size: int,
           segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The reference: `jax.lax.scan` of `_step` over tokens (no chunks)."""
  del chunk_size
  return naive.scan_tokens(_step, (q, k, v, g), initial_state, scale, segment_ids)


def _compose(earlier: tuple[jax.Array, jax.Array],
             later: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Composes the affine maps S -> a S + b of two token spans (earlier first)."""
  a_early, b_early = earlier
  a_late, b_late = later
  return a_early * a_late, a_late * b_early + b_late


@jax.custom_vjp
def _linear_recurrence(decay: jax.Array, update: jax.Array, state: jax.Array) -> jax.Array:
  """S_t = decay_t * S_{t-1} + update_t over a span: decay, update [batch, C, ...], state (S_{-1})
  [batch, ...] -> S [batch, C, ...], by an associative scan."""
  decay_in, update_in = jax.lax.associative_scan(_compose, (decay, update), axis=1)
  return decay_in * state[:, None] + update_in


def _linear_recurrence_fwd(decay: jax.Array, update: jax.Array,
                           state: jax.Array) -> tuple[jax.Array, tuple]:
  states = _linear_recurrence(decay, update, state)
  return states, (decay, state, states)


def _linear_recurrence_bwd(residuals: tuple, cotangent: jax.Array) -> tuple[jax.Array, ...]:
  """The adjoint lam_t = dL/dS_t is the recurrence backwards in time, lam_t = cotangent_t + decay_{t+1}
  lam_{t+1}; then dL/ddecay_t = lam_t S_{t-1}, dL/dupdate_t = lam_t and dL/dS_{-1} = decay_0 lam_0."""
  decay, state, states = residuals
  decay_next = jnp.concatenate([decay[:, 1:], jnp.zeros_like(decay[:, :1])], axis=1)
  _, lam = jax.lax.associative_scan(_compose, (decay_next, cotangent), axis=1, reverse=True)
  previous = jnp.concatenate([state[:, None], states[:, :-1]], axis=1)
  return lam * previous, lam, decay[:, 0] * lam[:, 0]


_linear_recurrence.defvjp(_linear_recurrence_fwd, _linear_recurrence_bwd)


def _scan(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
          initial_state: jax.Array, chunk_size: int,
          segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Associative scan inside chunks, sequential scan over chunks; same results as `_naive`."""
  seq_len = q.shape[1]
  # Padding at the end has k = 0 and g = 0: it leaves the state unchanged.
  chunks = tuple(jnp.moveaxis(common.to_chunks(x, chunk_size), 1, 0) for x in (q, k, v, g))
  continues = segments.chunk_masks(segment_ids, chunk_size).continues  # [batch, n_chunks, C] or None
  continues = None if continues is None else jnp.moveaxis(continues, 1, 0)

  def body(state, chunk):
    (q_c, k_c, v_c, g_c), continues_c = chunk  # [batch, C, heads, ...], [batch, C]
    decay = segments.keep(continues_c, jnp.exp(g_c.astype(common.STATE_DTYPE)))
    update = jnp.einsum("bchk,bchv->bchkv", k_c, v_c, preferred_element_type=common.STATE_DTYPE)
    states = _linear_recurrence(decay, update, state)  # [batch, C, heads, K, V]
    o_c = jnp.einsum("bchk,bchkv->bchv", q_c, states, preferred_element_type=common.STATE_DTYPE)
    return states[:, -1], o_c

  final_state, o = jax.lax.scan(jax.checkpoint(body), initial_state, (chunks, continues))
  o = common.from_chunks(jnp.moveaxis(o, 0, 1), seq_len)
  return (scale * o).astype(v.dtype), final_state


# "chunked" names the chunk-wise scan too, so that a model-wide kernel_impl="chunked" runs this family.
_IMPLS = {"naive": _naive, "scan": _scan, "chunked": _scan}
_AUTO = "scan"


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, state: jax.Array | None,
                  lead_axes: Sequence[str]) -> None:
  """Validates q, k [*lead, K], v [*lead, V], g [*lead, K, V] and state [batch, heads, K, V]."""
  common.check_qkv(q, k, v, lead_axes)
  key_dim, value_dim = q.shape[-1], v.shape[-1]
  common.check_shape("g", g, (*q.shape[:-1], key_dim, value_dim),
                     f"[{', '.join(lead_axes)}, key_dim, value_dim]")
  if state is not None:
    common.check_shape("state", state, (q.shape[0], q.shape[-2], key_dim, value_dim),
                       "[batch, heads, key_dim, value_dim]")


def diagonal_ssm(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float | None = None,
                 initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 impl: str = "auto",
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """The diagonal SSM recurrence over a sequence.

  Args:
    q: readout (C_t) [batch, seq, heads, key_dim].
    k: input map (B_t) [batch, seq, heads, key_dim].
    v: inputs [batch, seq, heads, value_dim].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5 as the other ops (an SSM's unscaled readout y = C h
      takes scale=1, or q * key_dim ** 0.5).
    initial_state: optional memory [batch, heads, key_dim, value_dim], of the first token's document.
    segment_ids: optional document id per token [batch, seq] int32: the memory restarts from zero where
      the id changes (linmoe/kernels/segments.py).
    impl: "naive" (token loop), "scan" (chunk-wise associative scan; also called "chunked") or "auto".
    chunk_size: tokens per associative scan; any seq works.

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  fn = common.select_impl(_IMPLS, impl, _AUTO, segment_ids)
  _check_inputs(q, k, v, g, initial_state, _SEQ_AXES)
  segments.check(segment_ids, *q.shape[:2])
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  batch, _, heads, key_dim = q.shape
  state = common.initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  return fn(q, k, v, g, scale=common.default_scale(scale, key_dim), initial_state=state,
            chunk_size=chunk_size)


def diagonal_ssm_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, state: jax.Array,
                      *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode step of `diagonal_ssm`.

  Args:
    q_t: readout [batch, heads, key_dim].
    k_t: input map [batch, heads, key_dim].
    v_t: input [batch, heads, value_dim].
    g_t: log decay [batch, heads, key_dim, value_dim].
    state: memory [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new state [batch, heads, key_dim, value_dim] fp32.
  """
  _check_inputs(q_t, k_t, v_t, g_t, state, _STEP_AXES)
  return _step(q_t, k_t, v_t, g_t, state.astype(common.STATE_DTYPE),
               common.default_scale(scale, q_t.shape[-1]))
