"""Public decay-recurrence ops: simple GLA (scalar decay per head) and GLA (decay per key channel).

Per head: `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t` (flash-linear-attention
layout and conventions). Both families run on the same implementations, with the log decay given a trailing
axis of 1 (simple GLA, broadcast over key_dim) or key_dim (GLA).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from linmoe.kernels import chunked, common, naive, pallas, segments

_SEQ_AXES = ("batch", "seq", "heads")
_STEP_AXES = ("batch", "heads")


def _naive(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float,
           initial_state: jax.Array | None, segment_ids: jax.Array | None = None,
           **tiling: int) -> tuple[jax.Array, jax.Array]:
  """The token loop under the implementations' common signature."""
  del tiling  # The token loop has no chunks.
  return naive.naive_recurrence(q, k, v, g, scale=scale, initial_state=initial_state,
                                segment_ids=segment_ids)


# Implementations by name; each takes (q, k, v, g [.., decay_dim], *, scale, initial_state, **tiling), and
# those of _SEGMENT_IMPLS a keyword segment_ids.
_IMPLS = {"naive": _naive, "chunked": chunked.chunked_recurrence, "pallas": pallas.pallas_recurrence}
_SEGMENT_IMPLS = (*common.SEGMENT_IMPLS, "pallas")


def auto_impl(q: jax.Array, v: jax.Array, per_key_decay: bool, **tiling: int) -> str:
  """"pallas" on a GPU for the sizes its GPU tests cover (tests/gpu/test_kernels_pallas_gpu.py, with and
  without segment ids; 3-9x faster than "chunked" there, benchmarks/RESULTS.md), else "chunked"."""
  sub_chunk = tiling.get("sub_chunk_size", chunked.DEFAULT_SUB_CHUNK_SIZE)
  if jax.default_backend() == "gpu" and pallas.supports(
      q.shape[-1], v.shape[-1], tiling["chunk_size"], sub_chunk, per_key_decay):
    return "pallas"
  return "chunked"


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None, state: jax.Array | None,
                  lead_axes: Sequence[str], per_key_decay: bool) -> jax.Array:
  """Validates shapes; returns the log decay as [*lead, decay_dim] (zeros of decay_dim 1 when g is None).

  `lead_axes` names the axes before the feature axis: ("batch", "seq", "heads") or ("batch", "heads").
  """
  common.check_qkv(q, k, v, lead_axes)
  lead_shape, key_dim, value_dim = q.shape[:-1], q.shape[-1], v.shape[-1]
  lead = ", ".join(lead_axes)
  if per_key_decay:
    if g is None:
      raise ValueError(f"g must have shape [{lead}, key_dim], got None (no decay: use simple_gla)")
    common.check_shape("g", g, (*lead_shape, key_dim), f"[{lead}, key_dim]")
  elif g is None:
    g = jnp.zeros((*lead_shape, 1), common.STATE_DTYPE)
  else:
    common.check_shape("g", g, lead_shape, f"[{lead}]")
    g = g[..., None]
  if state is not None:
    state_shape = (q.shape[0], q.shape[-2], key_dim, value_dim)
    common.check_shape("state", state, state_shape, "[batch, heads, key_dim, value_dim]")
  return g


def _run(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None, scale: float | None,
         initial_state: jax.Array | None, segment_ids: jax.Array | None, impl: str, per_key_decay: bool,
         **tiling: int) -> tuple[jax.Array, jax.Array]:
  """Validates the sequence inputs and calls the implementation named by `impl`."""
  fn = common.select_impl(_IMPLS, impl, auto_impl(q, v, per_key_decay, **tiling), segment_ids, _SEGMENT_IMPLS)
  g = _check_inputs(q, k, v, g, initial_state, _SEQ_AXES, per_key_decay)
  segments.check(segment_ids, *q.shape[:2])
  scale = common.default_scale(scale, q.shape[-1])
  return fn(q, k, v, g, scale=scale, initial_state=initial_state, **tiling)


def simple_gla(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None = None, *,
               scale: float | None = None, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, impl: str = "auto",
               chunk_size: int = chunked.DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """Linear attention with one data-dependent decay per head and token.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads], or None for no decay.
    scale: output scale, default key_dim ** -0.5.
    initial_state: optional memory [batch, heads, key_dim, value_dim], of the first token's document.
    segment_ids: optional document id per token [batch, seq] int32: the memory restarts from zero where
      the id changes (linmoe/kernels/segments.py); every impl takes them.
    impl: "naive", "chunked", "pallas" (key_dim, value_dim powers of two >= 16) or "auto".
    chunk_size: chunk length of the chunked form ("pallas": a power of two >= 16).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  return _run(q, k, v, g, scale, initial_state, segment_ids, impl, per_key_decay=False, chunk_size=chunk_size)


def gla(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float | None = None,
        initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None, impl: str = "auto",
        chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
        sub_chunk_size: int = chunked.DEFAULT_SUB_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """Gated linear attention: a data-dependent decay per key channel, head and token.

  Args:
    q: queries [batch, seq, heads, key_dim].
    k: keys [batch, seq, heads, key_dim].
    v: values [batch, seq, heads, value_dim].
    g: log decay (<= 0; -inf allowed) [batch, seq, heads, key_dim].
    scale: output scale, default key_dim ** -0.5.
    initial_state: optional memory [batch, heads, key_dim, value_dim], of the first token's document.
    segment_ids: optional document id per token [batch, seq] int32: the memory restarts from zero where
      the id changes (linmoe/kernels/segments.py); every impl takes them.
    impl: "naive", "chunked", "pallas" (key_dim, value_dim powers of two >= 16) or "auto".
    chunk_size: chunk length of the chunked form ("pallas": a power of two >= 16).
    sub_chunk_size: sub-chunk length of the chunked intra part; must divide chunk_size ("pallas": a power of
      two >= 16).

  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, final state [batch, heads, key_dim, value_dim] fp32.
  """
  return _run(q, k, v, g, scale, initial_state, segment_ids, impl, per_key_decay=True, chunk_size=chunk_size,
              sub_chunk_size=sub_chunk_size)


def _step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array | None, state: jax.Array,
          scale: float | None, per_key_decay: bool) -> tuple[jax.Array, jax.Array]:
  """Validates one token's inputs and runs the reference step."""
  g_t = _check_inputs(q_t, k_t, v_t, g_t, state, _STEP_AXES, per_key_decay)
  return naive.decay_step(q_t, k_t, v_t, g_t, state.astype(common.STATE_DTYPE),
                          common.default_scale(scale, q_t.shape[-1]))


def simple_gla_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array | None,
                    state: jax.Array, *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode step of `simple_gla`.

  Args:
    q_t: query [batch, heads, key_dim].
    k_t: key [batch, heads, key_dim].
    v_t: value [batch, heads, value_dim].
    g_t: log decay [batch, heads], or None for no decay.
    state: memory [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new state [batch, heads, key_dim, value_dim] fp32.
  """
  return _step(q_t, k_t, v_t, g_t, state, scale, per_key_decay=False)


def gla_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, g_t: jax.Array, state: jax.Array, *,
             scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode step of `gla`.

  Args:
    q_t: query [batch, heads, key_dim].
    k_t: key [batch, heads, key_dim].
    v_t: value [batch, heads, value_dim].
    g_t: log decay [batch, heads, key_dim].
    state: memory [batch, heads, key_dim, value_dim].
    scale: output scale, default key_dim ** -0.5.

  Returns:
    o_t [batch, heads, value_dim] in v's dtype, new state [batch, heads, key_dim, value_dim] fp32.
  """
  return _step(q_t, k_t, v_t, g_t, state, scale, per_key_decay=True)
