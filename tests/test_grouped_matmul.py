"""grouped_matmul: every implementation against the dense masked reference, outputs and both gradients.

On CPU the Pallas kernels run in the Pallas interpreter, at the default tiles (clamped to these shapes) and
at tiles of 16, so that row tiles straddle groups and K, N are not multiples of the tile.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.kernels import grouped_matmul_mosaic, grouped_matmul_pallas

ROWS, K, N, GROUPS = 37, 24, 40, 5
TILE_16 = grouped_matmul_pallas.Tiling(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
CONFIG_16 = grouped_matmul_pallas.Config(forward=TILE_16, input_grad=TILE_16, weight_grad=TILE_16)
# Group sizes (sum <= ROWS): uneven with a group of one row, empty groups with rows past the sum, one group
# holding every row, and no rows in any group.
LAYOUTS = {
    "uneven": (3, 11, 7, 1, 15),
    "empty_and_tail": (0, 9, 1, 0, 20),
    "one_group": (0, 0, 37, 0, 0),
    "all_empty": (0, 0, 0, 0, 0),
}
# Largest allowed |actual - expected|, relative to 1 + max |expected|; expected from fp32 inputs.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  """True fp32 matmuls on every backend, so that the tolerances mean the same everywhere."""
  with jax.default_matmul_precision("highest"):
    yield


def _pallas_16(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return grouped_matmul_pallas.grouped_matmul(x, w, group_sizes, CONFIG_16)


IMPLS = {
    "ragged_dot": functools.partial(kernels.grouped_matmul, impl="ragged_dot"),
    "pallas": functools.partial(kernels.grouped_matmul, impl="pallas"),
    "pallas_tile16": _pallas_16,
    "auto": kernels.grouped_matmul,
}
# Groups covering whole tiles of 16 rows (the weight gradient's unmasked whole steps) beside partial ones
# and straddled tiles: tile 16 only.
WHOLE_TILES = (16, 0, 19, 0, 1)
CASES = [(layout, impl) for layout in LAYOUTS for impl in IMPLS] + [("whole_tiles", "pallas_tile16")]
REFERENCE = functools.partial(kernels.grouped_matmul, impl="reference")


@functools.partial(jax.jit, static_argnames="impl")
def _output_and_grads(x: jax.Array, w: jax.Array, group_sizes: jax.Array, cotangent: jax.Array,
                      impl: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """out [M, N], dx [M, K] and dw [E, K, N] of impl, for the cotangent [M, N]."""
  fn = {"reference": REFERENCE, **IMPLS}[impl]
  out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), x, w)
  return (out, *vjp(cotangent))


def _inputs(seed: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [M, K], w [E, K, N] and a cotangent [M, N] in dtype; NumPy draws them."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((ROWS, K), (GROUPS, K, N), (ROWS, N)))


def _assert_close(actual: jax.Array, expected: jax.Array, tol: float, name: str) -> None:
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert np.all(np.isfinite(actual)), name
  err = np.max(np.abs(actual - expected), initial=0.0) / (1.0 + np.max(np.abs(expected), initial=0.0))
  assert err <= tol, f"{name}: error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("layout", "impl"), CASES)
def test_matches_reference(layout: str, impl: str, dtype: jnp.dtype):
  layout_sizes = {**LAYOUTS, "whole_tiles": WHOLE_TILES}[layout]
  sizes = jnp.asarray(layout_sizes, jnp.int32)
  x, w, cotangent = _inputs(len(layout), dtype)
  upcast = [a.astype(jnp.float32) for a in (x, w, cotangent)]
  expected = _output_and_grads(*upcast[:2], sizes, upcast[2], impl="reference")
  actual = _output_and_grads(x, w, sizes, cotangent, impl=impl)
  for name, a, e in zip(("out", "dx", "dw"), actual, expected):
    assert a.dtype == dtype, name
    _assert_close(a, e, TOLERANCES[dtype], name)
  out, dx, dw = actual
  used = sum(layout_sizes)
  assert not np.any(np.asarray(out[used:])) and not np.any(np.asarray(dx[used:])), "rows past the sum"
  empty = np.asarray(layout_sizes) == 0
  assert not np.any(np.asarray(dw)[empty]), "empty groups"


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_kernels_write_every_element(transpose_rhs: bool):
  """The kernels overwrite a NaN-poisoned output everywhere, rows past the sum and empty groups too;
  NaN in the input rows past the sum does not reach the output."""
  x, w, cotangent = _inputs(7, jnp.float32)
  sizes = jnp.asarray(LAYOUTS["empty_and_tail"], jnp.int32)
  used = sum(LAYOUTS["empty_and_tail"])
  x, cotangent = x.at[used:].set(jnp.nan), cotangent.at[used:].set(jnp.nan)
  offsets = grouped_matmul_pallas.group_offsets(sizes, ROWS)
  lhs, rhs = (cotangent, w) if transpose_rhs else (x, w)
  width = K if transpose_rhs else N
  out = grouped_matmul_pallas.gmm(lhs, rhs, offsets, TILE_16, transpose_rhs=transpose_rhs,
                                  out=jnp.full((ROWS, width), jnp.nan, jnp.float32))
  dw = grouped_matmul_pallas.tgmm(x, cotangent, offsets, TILE_16, jnp.float32,
                                  out=jnp.full((GROUPS, K, N), jnp.nan, jnp.float32))
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(dw)))


def test_tile_group_ranges():
  """Tiles of 4 rows over groups of sizes (0, 5, 0, 2) in 12 rows: tiles straddle, the last is past."""
  offsets = grouped_matmul_pallas.group_offsets(jnp.asarray([0, 5, 0, 2], jnp.int32), 12)
  first, end = grouped_matmul_pallas.tile_group_ranges(offsets, 12, 4)
  np.testing.assert_array_equal(first, [1, 1, 4])
  np.testing.assert_array_equal(end, [2, 4, 4])


@pytest.mark.parametrize(("backend", "architecture", "dtype", "expected"), [
    ("cpu", "other", jnp.bfloat16, "ragged_dot"), ("gpu", "other", jnp.bfloat16, "pallas"),
    ("gpu", "hopper", jnp.bfloat16, "mosaic"), ("gpu", "hopper", jnp.float32, "ragged_dot")])
def test_auto_rule(monkeypatch, backend: str, architecture: str, dtype: jnp.dtype, expected: str):
  module = importlib.import_module("linmoe.kernels.grouped_matmul")
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(module, "_architecture", lambda: architecture)
  assert module.auto_impl(dtype) == expected


def test_auto_falls_back_where_mosaic_does_not_tile(monkeypatch):
  """On a Hopper GPU "auto" takes "pallas" for rows, K or N off the Mosaic tiles; "mosaic" itself raises."""
  module = importlib.import_module("linmoe.kernels.grouped_matmul")
  monkeypatch.setattr(module, "auto_impl", lambda dtype: "mosaic")
  tiled = (jax.ShapeDtypeStruct((512, 128), jnp.bfloat16),
           jax.ShapeDtypeStruct((GROUPS, 128, 256), jnp.bfloat16))
  assert module._auto_for(*tiled) == "mosaic"  # pylint: disable=protected-access
  for x_shape, w_shape in [((ROWS, 128), (GROUPS, 128, 256)), ((512, K), (GROUPS, K, 256)),
                           ((512, 128), (GROUPS, 128, N))]:
    x, w = jax.ShapeDtypeStruct(x_shape, jnp.bfloat16), jax.ShapeDtypeStruct(w_shape, jnp.bfloat16)
    assert module._auto_for(x, w) == "pallas", (x_shape, w_shape)  # pylint: disable=protected-access
    with pytest.raises(grouped_matmul_mosaic.Unsupported, match="not a multiple"):
      grouped_matmul_mosaic.check_supported(x, w)
  with pytest.raises(grouped_matmul_mosaic.Unsupported, match="bf16 or fp16"):
    grouped_matmul_mosaic.check_supported(jax.ShapeDtypeStruct((512, 128), jnp.float32), tiled[1])
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
      kernels.grouped_matmul(jnp.zeros((512, 128), jnp.bfloat16), jnp.zeros((GROUPS, 128, 256), jnp.bfloat16),
                             jnp.zeros((GROUPS,), jnp.int32), impl="mosaic")


@pytest.mark.parametrize("seed", range(3))
def test_mosaic_tile_schedule(seed: int):
  """Every row is computed by exactly the pass of its own group; rows past the sum by the extra group."""
  rng = np.random.default_rng(seed)
  block, rows = 16, 16 * 6
  for _ in range(8):
    sizes = rng.integers(0, rows // 3, GROUPS) * (rng.random(GROUPS) < 0.7)  # some groups empty
    schedule = np.asarray(grouped_matmul_mosaic.tile_schedule(jnp.asarray(sizes, jnp.int32), rows, block))
    assert schedule.shape == (4, rows // block + 2 * (GROUPS + 1))
    owner = np.full(rows, -1)
    for group, base, lo, hi in schedule.T:
      assert 0 <= lo <= hi <= block and 0 <= base <= rows - block and (group >= 0 or lo == hi)
      assert base % grouped_matmul_mosaic.ROW_ALIGN == 0
      rows_of_pass = np.arange(base + lo, base + hi)
      assert np.all(owner[rows_of_pass] == -1), "a row computed twice"
      owner[rows_of_pass] = group
    np.testing.assert_array_equal(owner, np.repeat(np.arange(GROUPS + 1), [*sizes, rows - sizes.sum()]))


@pytest.mark.parametrize(("x_shape", "w_shape", "sizes_shape", "match"), [
    ((ROWS, K, 1), (GROUPS, K, N), (GROUPS,), "x must have shape"),
    ((ROWS, K), (GROUPS, K + 1, N), (GROUPS,), "w must have shape"),
    ((ROWS, K), (GROUPS, K, N), (GROUPS + 1,), "group_sizes must have shape"),
])
def test_shape_errors(x_shape, w_shape, sizes_shape, match: str):
  x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
  with pytest.raises(ValueError, match=match):
    kernels.grouped_matmul(x, w, jnp.zeros(sizes_shape, jnp.int32))


def test_dtype_errors():
  x, w = jnp.zeros((ROWS, K)), jnp.zeros((GROUPS, K, N))
  with pytest.raises(ValueError, match="group_sizes must be integers"):
    kernels.grouped_matmul(x, w, jnp.zeros((GROUPS,)))
  with pytest.raises(ValueError, match="w must have x's dtype"):
    kernels.grouped_matmul(x, w.astype(jnp.bfloat16), jnp.zeros((GROUPS,), jnp.int32))


def test_unknown_impl():
  x, w = jnp.zeros((ROWS, K)), jnp.zeros((GROUPS, K, N))
  with pytest.raises(ValueError, match="'ragged_dot', 'reference', 'pallas', 'mosaic', 'auto'"):
    kernels.grouped_matmul(x, w, jnp.zeros((GROUPS,), jnp.int32), impl="triton")
