"""Grouped matmul as Pallas kernels (Triton on GPU, the Pallas interpreter elsewhere), with a custom VJP.

Rows of x are sorted by group and cut into tiles of `block_m` rows that may straddle group boundaries
(MegaBlocks / "gmm" style). The forward kernel gives each (row tile, column tile) one program, which loops
over the groups overlapping its rows and loads x with the other groups' rows masked to zero: every output
element is written exactly once, and rows past the last group get zeros. The input gradient is the same
kernel on dy with w read transposed. The weight gradient dw[e] = x_e^T dy_e is a "transposed" grouped
matmul: one program per (expert, K tile, N tile) sums over the expert's rows, the largest experts first
so that a skewed expert does not start last; its steps of whole tiles load unmasked.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from linmoe.kernels.pallas import _platform

ACC_DTYPE = jnp.float32
MIN_BLOCK = 16  # Smallest side of a Triton dot.


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block sizes (powers of 2, at least 16) and Triton launch parameters of one kernel.

  For the forward kernel an output tile is [block_m, block_n] and each step sums over block_k of the
  reduction axis; for the weight-gradient kernel an output tile is [block_k, block_n] and each step sums
  over block_m rows.
  """
  block_m: int
  block_n: int
  block_k: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Config:
  """Tilings of the forward kernel, of the same kernel computing dx, and of the weight-gradient kernel.

  The defaults were the fastest of benchmarks/moe.py --sweep on an H100 at the A0.3B-2B expert shape.
  """
  forward: Tiling = Tiling(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
  input_grad: Tiling = Tiling(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4)
  weight_grad: Tiling = Tiling(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3)


def group_offsets(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[E] sizes -> [E + 1] int32 row offsets (0 first), clamped to num_rows."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def tile_group_ranges(offsets: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, jax.Array]:
  """The groups whose rows overlap each row tile, as a half-open range [first, end).

  Args:
    offsets: [E + 1] int32 row offsets of the groups.
    num_rows: M.
    block_m: rows per tile.

  Returns:
    first, end: [ceil(M / block_m)] int32; empty (first >= end) for tiles past the last group.
  """
  starts = jnp.arange(pl.cdiv(num_rows, block_m), dtype=jnp.int32) * block_m
  stops = jnp.minimum(starts + block_m, num_rows)
  # compare_all is one small fused kernel; the default binary search cost about 60 us a call on an H100.
  first = jnp.searchsorted(offsets[1:], starts, side="right", method="compare_all").astype(jnp.int32)
  end = jnp.searchsorted(offsets[:-1], stops, side="left", method="compare_all").astype(jnp.int32)
  return first, end


def largest_first(offsets: jax.Array) -> jax.Array:
  """[E + 1] offsets -> [E] int32 expert ids by decreasing group size."""
  return jnp.argsort(offsets[:-1] - offsets[1:], stable=True).astype(jnp.int32)


def _fit(block: int, dim: int) -> int:
  """`block`, shrunk to the next power of 2 at or above `dim` (at least MIN_BLOCK)."""
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(dim)))


def _in_bounds(start: jax.Array, size: int, bound: int) -> jax.Array:
  """[size] mask of start + arange(size) < bound."""
  return start + jnp.arange(size) < bound


def _mask(rows: jax.Array | None, cols: jax.Array | None, shape: tuple[int, int]) -> jax.Array | None:
  """[R, C] mask from optional [R] and [C] masks (None: all true); None when both are None."""
  if rows is None and cols is None:
    return None
  rows = jnp.ones(shape[0], bool) if rows is None else rows
  cols = jnp.ones(shape[1], bool) if cols is None else cols
  return rows[:, None] & cols[None, :]


def _load(ref, mask: jax.Array | None) -> jax.Array:
  """Loads a block; masked-out elements read as zero."""
  return plgpu.load(ref, mask=mask, other=None if mask is None else 0.0)


def _compiler_params(tiling: Tiling) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _gmm_kernel(first_ref, end_ref, offsets_ref, x_ref, w_ref, *out_refs, bm: int, bn: int, bk: int,
                transpose_rhs: bool):
  """One [bm, bn] tile of out = x_g @ w[g] (or x_g @ w[g]^T), summed over the groups owning its rows.

  Measured slower on the H100 at the A0.3B-2B shape (benchmarks/RESULTS.md): a second, unmasked loop
  for tiles inside one group (Triton gives each loop its own shared memory, past the limit at these
  tiles); each group's product kept by a select instead of masked loads (a second fp32 accumulator
  spills: 0.52 -> 0.64 ms); a narrower last column tile as a second launch (x read twice: +3%).
  Refs: first, end [T]; offsets [E + 1]; x [M, R]; w [E, R, P] (or [E, P, R] when transposed); then an
  optional aliased initial output, ignored; out [M, P].
  """
  out_ref = out_refs[-1]
  num_rows, depth = x_ref.shape
  width = out_ref.shape[1]
  col_tile, row_tile = pl.program_id(0), pl.program_id(1)
  rows = row_tile * bm + jnp.arange(bm)
  row_block, col_block = pl.ds(row_tile * bm, bm), pl.ds(col_tile * bn, bn)
  col_ok = _in_bounds(col_tile * bn, bn, width) if width % bn else None

  def group_step(g, acc):
    in_group = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])

    def depth_step(kt, acc):
      depth_block = pl.ds(kt * bk, bk)
      depth_ok = _in_bounds(kt * bk, bk, depth) if depth % bk else None
      a = _load(x_ref.at[row_block, depth_block], mask=_mask(in_group, depth_ok, (bm, bk)))
      if transpose_rhs:
        b = _load(w_ref.at[g, col_block, depth_block], mask=_mask(col_ok, depth_ok, (bn, bk)))
        dims = ((1,), (1,))
      else:
        b = _load(w_ref.at[g, depth_block, col_block], mask=_mask(depth_ok, col_ok, (bk, bn)))
        dims = ((1,), (0,))
      return acc + jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=ACC_DTYPE)

    return jax.lax.fori_loop(0, pl.cdiv(depth, bk), depth_step, acc)

  acc = jax.lax.fori_loop(first_ref[row_tile], end_ref[row_tile], group_step,
                          jnp.zeros((bm, bn), ACC_DTYPE))
  row_ok = _in_bounds(row_tile * bm, bm, num_rows) if num_rows % bm else None
  plgpu.store(out_ref.at[row_block, col_block], acc.astype(out_ref.dtype),
              mask=_mask(row_ok, col_ok, (bm, bn)))


def gmm(x: jax.Array, w: jax.Array, offsets: jax.Array, tiling: Tiling, *, transpose_rhs: bool = False,
        out: jax.Array | None = None) -> jax.Array:
  """Grouped matmul out[rows of g] = x[rows of g] @ w[g] (w[g]^T when transpose_rhs); other rows zero.

  Args:
    x: [M, R], rows sorted by group.
    w: [E, R, P], or [E, P, R] when transpose_rhs.
    offsets: [E + 1] int32 group row offsets (`group_offsets`).
    tiling: block sizes; clamped to the problem.
    transpose_rhs: read w[g] as its transpose (the input gradient of the forward matmul).
    out: optional [M, P] buffer the result is written into (tests poison it to catch unwritten tiles).

  Returns:
    [M, P] in x's dtype.
  """
  num_rows, depth = x.shape
  width = w.shape[1] if transpose_rhs else w.shape[2]
  bm, bn, bk = (_fit(tiling.block_m, num_rows), _fit(tiling.block_n, width),
                _fit(tiling.block_k, depth))
  first, end = tile_group_ranges(offsets, num_rows, bm)
  kernel = functools.partial(_gmm_kernel, bm=bm, bn=bn, bk=bk, transpose_rhs=transpose_rhs)
  args = (first, end, offsets, x, w) + (() if out is None else (out,))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_rows, width), x.dtype),
      grid=(pl.cdiv(width, bn), pl.cdiv(num_rows, bm)),
      input_output_aliases={} if out is None else {len(args) - 1: 0},
      compiler_params=_compiler_params(tiling),
      interpret=_platform.interpret_mode(),
      name="grouped_matmul",
  )(*args)


def _tgmm_kernel(order_ref, offsets_ref, x_ref, dy_ref, *out_refs, bm: int, bn: int, bk: int):
  """One [bk, bn] tile of dw[e] = x_e^T dy_e, e the expert at this program's slot of `order`.

  Refs: order [E]; offsets [E + 1]; x [M, K]; dy [M, N]; then an optional aliased initial output,
  ignored; dw [E, K, N].
  """
  dw_ref = out_refs[-1]
  depth, width = dw_ref.shape[1:]
  col_tile, depth_tile, slot = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  expert = order_ref[slot]
  start, stop = offsets_ref[expert], offsets_ref[expert + 1]
  depth_block, col_block = pl.ds(depth_tile * bk, bk), pl.ds(col_tile * bn, bn)
  depth_ok = _in_bounds(depth_tile * bk, bk, depth) if depth % bk else None
  col_ok = _in_bounds(col_tile * bn, bn, width) if width % bn else None

  def row_step(i: jax.Array, acc: jax.Array, masked: bool) -> jax.Array:
    row_start = start + i * bm
    row_ok = _in_bounds(row_start, bm, stop) if masked else None
    a = _load(x_ref.at[pl.ds(row_start, bm), depth_block], mask=_mask(row_ok, depth_ok, (bm, bk)))
    b = _load(dy_ref.at[pl.ds(row_start, bm), col_block], mask=_mask(row_ok, col_ok, (bm, bn)))
    return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=ACC_DTYPE)

  # Whole steps of bm rows load unmasked; a last partial step, if any, masks the rows past the expert.
  num_full = jax.lax.div(stop - start, bm)
  acc = jax.lax.fori_loop(0, num_full, functools.partial(row_step, masked=False),
                          jnp.zeros((bk, bn), ACC_DTYPE))
  acc = jax.lax.cond(start + num_full * bm < stop, functools.partial(row_step, num_full, masked=True),
                     lambda acc: acc, acc)
  plgpu.store(dw_ref.at[expert, depth_block, col_block], acc.astype(dw_ref.dtype),
              mask=_mask(depth_ok, col_ok, (bk, bn)))


def tgmm(x: jax.Array, dy: jax.Array, offsets: jax.Array, tiling: Tiling, dtype: jnp.dtype, *,
         out: jax.Array | None = None) -> jax.Array:
  """Transposed grouped matmul dw[e] = x_e^T dy_e over each group's rows; zero for empty groups.

  Args:
    x: [M, K], rows sorted by group.
    dy: [M, N], same rows.
    offsets: [E + 1] int32 group row offsets.
    tiling: block sizes (block_m: rows per step; [block_k, block_n]: output tile); clamped.
    dtype: dtype of the result.
    out: optional [E, K, N] buffer the result is written into (tests poison it).

  Returns:
    [E, K, N] in `dtype`.
  """
  num_rows, depth = x.shape
  width = dy.shape[1]
  num_groups = offsets.shape[0] - 1
  bm, bn, bk = (_fit(tiling.block_m, num_rows), _fit(tiling.block_n, width),
                _fit(tiling.block_k, depth))
  args = (largest_first(offsets), offsets, x, dy) + (() if out is None else (out,))
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm, bn=bn, bk=bk),
      out_shape=jax.ShapeDtypeStruct((num_groups, depth, width), dtype),
      grid=(pl.cdiv(width, bn), pl.cdiv(depth, bk), num_groups),
      input_output_aliases={} if out is None else {len(args) - 1: 0},
      compiler_params=_compiler_params(tiling),
      interpret=_platform.interpret_mode(),
      name="grouped_matmul_weight_grad",
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   config: Config = Config()) -> jax.Array:
  """x [M, K] (rows sorted by group) @ w [E, K, N] per group -> [M, N] in x's dtype; fp32 accumulation.

  Rows past sum(group_sizes) give zeros. Both gradients are grouped kernels.
  """
  return gmm(x, w, group_offsets(group_sizes, x.shape[0]), config.forward)


def _grouped_matmul_fwd(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                        config: Config) -> tuple[jax.Array, tuple]:
  offsets = group_offsets(group_sizes, x.shape[0])
  return gmm(x, w, offsets, config.forward), (x, w, offsets)


def _grouped_matmul_bwd(config: Config, residuals: tuple, dy: jax.Array) -> tuple:
  x, w, offsets = residuals
  dx = gmm(dy, w, offsets, config.input_grad, transpose_rhs=True)
  dw = tgmm(x, dy, offsets, config.weight_grad, w.dtype)
  return dx, dw, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
