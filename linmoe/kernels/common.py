"""Helpers shared by the recurrence ops: shape checks, impl dispatch, state and chunk layout."""

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

STATE_DTYPE = jnp.float32
AUTO_IMPL = "auto"
# The implementations that take `segment_ids` (linmoe/kernels/segments.py) in every op; an op may add its own
# (select_impl's segment_impls).
SEGMENT_IMPLS = ("naive", "chunked", "scan")
DEFAULT_SEGMENT_IMPL = "chunked"


def check_shape(name: str, x: jax.Array, expected: Sequence[int], layout: str) -> None:
  """Raises ValueError unless `x.shape == expected`; `layout` names the axes, e.g. "[batch, heads]"."""
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, lead_axes: Sequence[str]) -> None:
  """Checks q, k: [*lead, key_dim] and v: [*lead, value_dim] with the same leading axes.

  Args:
    q: queries [*lead, key_dim].
    k: keys, same shape as q.
    v: values [*lead, value_dim].
    lead_axes: names of the leading axes, e.g. ("batch", "seq", "heads").
  """
  n_lead = len(lead_axes)
  lead = ", ".join(lead_axes)
  if q.ndim != n_lead + 1:
    raise ValueError(f"q must have shape [{lead}, key_dim], got {tuple(q.shape)}")
  check_shape("k", k, q.shape, f"[{lead}, key_dim] (as q)")
  if v.ndim != n_lead + 1 or v.shape[:n_lead] != q.shape[:n_lead]:
    raise ValueError(
        f"v must have shape [{lead}, value_dim] with [{lead}] = {tuple(q.shape[:n_lead])} as q, "
        f"got {tuple(v.shape)}")


def default_scale(scale: float | None, key_dim: int) -> float:
  """The output scale: `scale` if given, else key_dim ** -0.5."""
  return key_dim**-0.5 if scale is None else scale


def initial_state_or_zeros(initial_state: jax.Array | None, batch: int, heads: int, key_dim: int,
                           value_dim: int) -> jax.Array:
  """The starting memory [batch, heads, key_dim, value_dim] in fp32 (zeros when None)."""
  if initial_state is None:
    return jnp.zeros((batch, heads, key_dim, value_dim), STATE_DTYPE)
  return initial_state.astype(STATE_DTYPE)


def select_impl(impls: Mapping[str, Callable], impl: str, auto: str, segment_ids: jax.Array | None = None,
                segment_impls: Sequence[str] = SEGMENT_IMPLS) -> Callable:
  """Looks `impl` up in `impls`; "auto" means `auto`. Raises ValueError naming the allowed values.

  With segment_ids, the implementation must take them (segment_impls, the op's): "auto" falls back to
  DEFAULT_SEGMENT_IMPL, another name raises; the returned function has segment_ids bound.
  """
  name = auto if impl == AUTO_IMPL else impl
  if name not in impls:
    allowed = ", ".join(repr(n) for n in [*impls, AUTO_IMPL])
    raise ValueError(f"impl must be one of {allowed}, got {impl!r}")
  if segment_ids is None:
    return impls[name]
  if name not in segment_impls:
    if impl != AUTO_IMPL:
      supported = ", ".join(repr(n) for n in segment_impls if n in impls)
      raise ValueError(f"impl={impl!r} does not support segment_ids yet; use one of {supported}")
    name = DEFAULT_SEGMENT_IMPL
  return functools.partial(impls[name], segment_ids=segment_ids)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  """Zero-pads the seq axis to a multiple of chunk_size and splits it.

  Args:
    x: [batch, seq, ...].
    chunk_size: C.

  Returns:
    [batch, n_chunks, C, ...] with n_chunks = ceil(seq / C).
  """
  batch, seq_len = x.shape[:2]
  pad = -seq_len % chunk_size
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(batch, (seq_len + pad) // chunk_size, chunk_size, *x.shape[2:])


def from_chunks(x: jax.Array, seq_len: int) -> jax.Array:
  """Inverse of `to_chunks`: [batch, n_chunks, C, ...] -> [batch, seq_len, ...]."""
  batch, n_chunks, chunk_size = x.shape[:3]
  return x.reshape(batch, n_chunks * chunk_size, *x.shape[3:])[:, :seq_len]
