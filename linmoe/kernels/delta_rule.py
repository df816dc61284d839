"""Public delta-rule ops: DeltaNet, and Gated DeltaNet with a scalar log decay per head and token.

Per head: `S_t = (I - beta_t k_t k_t^T)(exp(g_t) S_{t-1}) + beta_t k_t v_t^T`, `o_t = scale * S_t^T q_t`
(flash-linear-attention layout and conventions). The op does not normalise k; callers do (e.g. L2 norm), as
the rule is only stable for beta_t |k_t|^2 in [0, 2].
"""

from collections.abc import Sequence

import jax

from linmoe.kernels import chunked, common, delta_chunked, delta_naive, gla, segments
from linmoe.kernels.pallas import delta as pallas_delta

_SEQ_AXES = ("batch", "seq", "heads")
_STEP_AXES = ("batch", "heads")


def _naive(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array, *, scale: float,
           initial_state: jax.Array | None, segment_ids: jax.Array | None = None,
           **tiling: int) -> tuple[jax.Array, jax.Array]:
  """The token loop under the implementations' common signature."""
  del tiling  # The token loop has no chunks.
  return delta_naive.naive_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                      segment_ids=segment_ids)


# Implementations by name; each takes (q, k, v, beta, g [.., 1], *, scale, initial_state, **tiling), and
# those of _SEGMENT_IMPLS a keyword segment_ids.
_IMPLS = {"naive": _naive, "chunked": delta_chunked.chunked_delta_rule,
          "pallas": pallas_delta.pallas_delta_rule}
_SEGMENT_IMPLS = (*common.SEGMENT_IMPLS, "pallas")


def auto_impl(q: jax.Array, v: jax.Array, chunk_size: int) -> str:
  """"pallas" on a GPU for the sizes its GPU tests cover (tests/gpu/test_kernels_pallas_delta_gpu.py), else
  "chunked"."""
  if jax.default_backend() == "gpu" and pallas_delta.supports(q.shape[-1], v.shape[-1], chunk_size):
    return "pallas"
  return "chunked"


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array | None,
                  state: jax.Array | None, lead_axes: Sequence[str]) -> jax.Array:
  """Validates shapes as simple GLA does, plus beta [*lead]; returns the log decay as [*lead, 1]."""
  g = gla._check_inputs(q, k, v, g, state, lead_axes, per_key_decay=False)
  common.check_shape("beta", beta, q.shape[:-1], f"[{', '.join(lead_axes)}]")
  return g


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array | None = None, *,
               scale: float | None = None, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, impl: str = "auto",
               chunk_size: int = chunked.DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """The delta rule (DeltaNet), gated by a data-dependent decay per head and token when g is given.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim], normalised by the caller (e.g. L2).
    v: values [batch, seq, heads, value_dim].
    beta: write strength in [0, 1] [batch, seq, heads].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads], or None for no decay (DeltaNet).
    scale: output scale, default key_dim ** -0.5.
    initial_state: optional memory [batch, heads, key_dim, value_dim], of the first token's document.
    segment_ids: optional document id per token [batch, seq] int32: the memory restarts from zero where
      the id changes (linmoe/kernels/segments.py).
    impl: "naive", "chunked", "pallas" (key_dim, value_dim 64 or 128) or "auto".
    chunk_size: chunk length of the chunked form ("pallas": a power of two >= 16).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  fn = common.select_impl(_IMPLS, impl, auto_impl(q, v, chunk_size), segment_ids, _SEGMENT_IMPLS)
  g = _check_inputs(q, k, v, beta, g, initial_state, _SEQ_AXES)
  segments.check(segment_ids, *q.shape[:2])
  scale = common.default_scale(scale, q.shape[-1])
  return fn(q, k, v, beta, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size)


def delta_rule_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, beta_t: jax.Array,
                    g_t: jax.Array | None, state: jax.Array, *,
                    scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode step of `delta_rule`.

  Args:
    q_t: query [batch, heads, key_dim].
    k_t: key [batch, heads, key_dim].
    v_t: value [batch, heads, value_dim].
    beta_t: write strength in [0, 1] [batch, heads].
    g_t: log decay [batch, heads], or None for no decay.
    state: memory [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new state [batch, heads, key_dim, value_dim] fp32.
  """
  g_t = _check_inputs(q_t, k_t, v_t, beta_t, g_t, state, _STEP_AXES)
  return delta_naive.delta_step(q_t, k_t, v_t, beta_t, g_t, state.astype(common.STATE_DTYPE),
                                common.default_scale(scale, q_t.shape[-1]))
