"""Grouped matmul over experts: rows of x sorted by group, one weight matrix per group.

Semantics of `jax.lax.ragged_dot`: out[rows of group e] = x[rows of group e] @ w[e], groups laid out in
order, rows past sum(group_sizes) zero. The output has x's dtype; products accumulate in fp32.
"""

import jax
import jax.numpy as jnp

from linmoe.kernels import common, grouped_matmul_mosaic, grouped_matmul_pallas

ACC_DTYPE = jnp.float32
# What "auto" takes, by (backend, GPU architecture, dtype), each entry measured fastest by
# benchmarks/moe.py and covered by tests/gpu (benchmarks/RESULTS.md); elsewhere ragged_dot. "mosaic"
# falls back to "pallas" for shapes its kernels do not tile.
_AUTO = {
    ("gpu", "hopper", jnp.dtype(jnp.bfloat16)): "mosaic",
    ("gpu", "other", jnp.dtype(jnp.bfloat16)): "pallas",
}


def _ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """XLA's ragged dot with fp32 accumulation."""
  out = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=ACC_DTYPE)
  return out.astype(x.dtype)


def _reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Dense and masked, for tests: the sum over experts of x @ w[e] (fp32) kept on the rows of e."""
  num_rows, num_groups = x.shape[0], w.shape[0]
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  row_group = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")  # num_groups past the sum
  x32 = x.astype(ACC_DTYPE)

  def add_group(e, out):
    product = jnp.matmul(x32, w[e].astype(ACC_DTYPE), precision=jax.lax.Precision.HIGHEST)
    return out + jnp.where((row_group == e)[:, None], product, 0.0)

  out = jax.lax.fori_loop(0, num_groups, add_group, jnp.zeros((num_rows, w.shape[2]), ACC_DTYPE))
  return out.astype(x.dtype)


def _pallas(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return grouped_matmul_pallas.grouped_matmul(x, w, group_sizes)


def _mosaic(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  if jax.default_backend() != "gpu":
    raise ValueError(f"impl='mosaic' needs a Hopper GPU, the default backend is {jax.default_backend()}")
  grouped_matmul_mosaic.check_supported(x, w)
  return grouped_matmul_mosaic.grouped_matmul(x, w, group_sizes)


# Implementations by name; each takes (x [M, K], w [E, K, N], group_sizes [E]).
_IMPLS = {"ragged_dot": _ragged_dot, "reference": _reference, "pallas": _pallas, "mosaic": _mosaic}


def _architecture() -> str:
  """"hopper" for a compute capability 9.x GPU, else "other"."""
  capability = getattr(jax.devices()[0], "compute_capability", "")
  return "hopper" if str(capability).startswith("9.") else "other"


def auto_impl(dtype: jnp.dtype) -> str:
  """The implementation "auto" picks for inputs of `dtype` on the default device (shapes aside)."""
  backend = jax.default_backend()
  architecture = _architecture() if backend == "gpu" else "other"
  return _AUTO.get((backend, architecture, jnp.dtype(dtype)), "ragged_dot")


def _auto_for(x: jax.Array, w: jax.Array) -> str:
  """`auto_impl`, with "mosaic" replaced by "pallas" where the Mosaic kernels do not tile x and w."""
  name = auto_impl(x.dtype)
  if name == "mosaic":
    try:
      grouped_matmul_mosaic.check_supported(x, w)
    except grouped_matmul_mosaic.Unsupported:
      return "pallas"
  return name


def _check_inputs(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> None:
  """Raises ValueError unless x: [M, K], w: [E, K, N] of x's dtype and group_sizes: [E] integers."""
  if x.ndim != 2:
    raise ValueError(f"x must have shape [rows, K], got {tuple(x.shape)}")
  if w.ndim != 3 or w.shape[1] != x.shape[1]:
    raise ValueError(f"w must have shape [groups, K, N] with K = {x.shape[1]} as x, got {tuple(w.shape)}")
  common.check_shape("group_sizes", group_sizes, (w.shape[0],), "[groups]")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
  if w.dtype != x.dtype:
    raise ValueError(f"w must have x's dtype {x.dtype}, got {w.dtype}")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "auto") -> jax.Array:
  """Per-group matmul of row-sorted x with the group's weights (`jax.lax.ragged_dot` semantics).

  Args:
    x: [M, K], rows sorted by group.
    w: [E, K, N], x's dtype.
    group_sizes: [E] int32 rows per group, summing to at most M.
    impl: "ragged_dot" (XLA), "reference" (dense masked, for tests), "pallas" (Triton on GPU, the Pallas
      interpreter elsewhere), "mosaic" (Pallas Mosaic GPU, Hopper only; shapes it does not tile raise
      `grouped_matmul_mosaic.Unsupported`) or "auto" (`auto_impl`; "pallas" where "mosaic" does not tile).

  Returns:
    [M, N] in x's dtype; rows past sum(group_sizes) are zero.
  """
  _check_inputs(x, w, group_sizes)
  fn = common.select_impl(_IMPLS, impl, _auto_for(x, w))
  return fn(x, w, group_sizes)
