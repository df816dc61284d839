"""Grouped matmul as Pallas Mosaic GPU kernels for Hopper (wgmma, TMA, warp specialisation), custom VJP.

GPU only (sm_90); `jax.experimental.pallas.mosaic_gpu` is imported when a kernel is built, so this module
imports on any backend. Shapes the kernels do not tile raise `Unsupported`, which "auto" treats as a
reason to fall back to the Pallas (Triton) kernels.

Forward and input gradient (`gmm`): a persistent kernel, one CTA per SM, three warpgroups: one issues TMA
loads, two each compute a [tile_m, tile_n] half of a [2 * tile_m, tile_n] output tile with wgmma.
Each group's row tiles start at its first row (a schedule built by XLA, `tile_schedule`); a group's
last tile runs into the next group's rows, computes them with this group's weights and stores only its
own, through a ladder of TMA stores of 2^i rows; a warpgroup whose half of the tile holds none of the
group's rows skips its products. Rows past sum(group_sizes) form one extra group whose tiles skip the
wgmma and store zeros.

Weight gradient (`tgmm`): dw[e] = x_e^T dy_e, one [block_k, block_n] tile of dw[e] per loop step, summed
over the group's rows in steps of block_m, the first and last steps' rows of other groups zeroed in
shared memory (JAX's transposed ragged-dot example does the same). It was not faster than the Pallas
(Triton) weight-gradient kernel on the H100, so `Config` takes that one by default.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linmoe.kernels import grouped_matmul_pallas
from linmoe.kernels.grouped_matmul_pallas import group_offsets

ACC_DTYPE = jnp.float32
NUM_COMPUTE_WGS = 2  # Compute warpgroups per CTA; one more issues the loads.
ROW_ALIGN = 8  # Row tiles of x start at multiples of this (its shared-memory tiling).
MEMORY_REGISTERS = 40  # Registers per thread left to the load warpgroup (as JAX's Hopper matmul).


class Unsupported(ValueError):
  """A shape or dtype the Mosaic kernels do not tile; callers may fall back to another implementation."""


@dataclasses.dataclass(frozen=True)
class GmmTiling:
  """Tiles of the forward / input-gradient kernel: each compute warpgroup owns a [tile_m, tile_n] output
  tile (the CTA [2 * tile_m, tile_n]); steps of tile_k; `stages` loads in flight; the persistent loop
  walks the tiles in snakes `grid_tile_width` column tiles wide (None: all of them, so that the SMs
  working at once share few row tiles of x); the output leaves through shared memory in chunks of
  `epilogue_m` rows (less shared memory, room for more stages).

  The defaults were the fastest of benchmarks/moe.py's variants on an H100 at the A0.3B-2B shape
  (benchmarks/RESULTS.md): snakes 1 column tile wide re-read x once per column tile (0.82 ms forward),
  4 wide 0.46 ms, all 7 0.42 ms; 4 stages (64-row epilogue) 0.40 ms.
  """
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  grid_tile_width: int | None = None
  epilogue_m: int = 64


@dataclasses.dataclass(frozen=True)
class TgmmTiling:
  """Tiles of the weight-gradient kernel: [block_k, block_n] of dw[e] per step over block_m rows."""
  block_k: int = 128
  block_n: int = 128
  block_m: int = 128
  stages: int = 3
  grid_tile_width: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  """Tilings of the forward kernel, of the same kernel computing dx, and of the weight-gradient kernel:
  a `TgmmTiling` runs the Mosaic one, a `grouped_matmul_pallas.Tiling` the Pallas (Triton) one."""
  forward: GmmTiling = GmmTiling()
  input_grad: GmmTiling = GmmTiling()
  # The Pallas (Triton) kernel: as fast with even groups, 12% faster with skewed ones (RESULTS.md).
  weight_grad: TgmmTiling | grouped_matmul_pallas.Tiling = grouped_matmul_pallas.Config().weight_grad


def _plgpu():
  """jax.experimental.pallas.mosaic_gpu, imported on first use."""
  from jax.experimental.pallas import mosaic_gpu  # pylint: disable=g-import-not-at-top
  return mosaic_gpu


def _num_sms() -> int:
  """Streaming multiprocessors of the default device (132 on an H100 SXM when it reports none)."""
  return getattr(jax.devices()[0], "core_count", 0) or 132


def _swizzled(plgpu, minor: int, dtype: jnp.dtype) -> tuple:
  """Shared-memory transforms for tiles whose minor dimension has `minor` elements of dtype."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise Unsupported(message)


def _check_gmm(name: str, tiling: GmmTiling, rows: int, reduce: int, cols: int) -> None:
  """Raises Unsupported unless `gmm` at `tiling` tiles [rows, reduce] x [reduce, cols]."""
  cta_m = NUM_COMPUTE_WGS * tiling.tile_m
  _require(tiling.tile_m % tiling.epilogue_m == 0,
           f"mosaic {name}: epilogue_m {tiling.epilogue_m} must divide tile_m {tiling.tile_m}")
  _require(rows % cta_m == 0 and reduce % tiling.tile_k == 0 and cols % tiling.tile_n == 0,
           f"mosaic {name}: [rows, reduction, columns] = {(rows, reduce, cols)} not a multiple of "
           f"{(cta_m, tiling.tile_k, tiling.tile_n)}")


def _check_tgmm(tiling: TgmmTiling, depth: int, width: int) -> None:
  """Raises Unsupported unless `tgmm` at `tiling` tiles a [depth, width] weight gradient."""
  _require(depth % tiling.block_k == 0 and width % tiling.block_n == 0,
           f"mosaic weight_grad: [K, N] = {(depth, width)} not a multiple of "
           f"{(tiling.block_k, tiling.block_n)}")


def check_supported(x: jax.Array, w: jax.Array, config: Config = Config()) -> None:
  """Raises Unsupported unless the kernels of `config` tile x [M, K] and w [E, K, N] (bf16 or fp16)."""
  _require(x.dtype in (jnp.bfloat16, jnp.float16),
           f"mosaic grouped matmul needs bf16 or fp16, got {x.dtype}")
  (rows, depth), width = x.shape, w.shape[2]
  _check_gmm("forward", config.forward, rows, depth, width)
  _check_gmm("input_grad", config.input_grad, rows, width, depth)
  if isinstance(config.weight_grad, TgmmTiling):
    _check_tgmm(config.weight_grad, depth, width)


def tile_schedule(group_sizes: jax.Array, num_rows: int, block: int) -> jax.Array:
  """The row tile each step of the forward kernel's M axis computes, and the group it computes it for.

  Each group's tiles start at its first row (rounded down to a multiple of ROW_ALIGN, as the TMA tiling
  of x needs) and step by `block` rows, so that every row is computed for its own group about once
  (tiles cut at multiples of `block` would compute each tile straddling two groups twice); a tile that
  would run past the last row is moved back to end there. A tile's rows outside [lo, hi) belong to other
  groups and are not stored. Groups are the E given ones and one more holding the rows past their sum.

  Args:
    group_sizes: [E] int rows per group.
    num_rows: M, a multiple of block (at least block).
    block: rows per tile.

  Returns:
    [4, M / block + 2 (E + 1)] int32 rows: group (E for the rows past the sum, -1 for unused steps), the
    tile's first row (a multiple of ROW_ALIGN), and the first and end row of the group inside the tile
    (0 <= lo <= hi <= block).
  """
  starts = group_offsets(group_sizes, num_rows)
  ends = jnp.concatenate([starts[1:], jnp.full((1,), num_rows, jnp.int32)])
  aligned = starts // ROW_ALIGN * ROW_ALIGN
  count = jnp.where(ends > starts, (ends - aligned + block - 1) // block, 0)
  tile_end = jnp.cumsum(count)
  # A group of s rows takes ceil((s + ROW_ALIGN - 1) / block) < s / block + 2 tiles.
  steps = jnp.arange(num_rows // block + 2 * starts.shape[0], dtype=jnp.int32)
  group = jnp.searchsorted(tile_end, steps, side="right", method="compare_all").astype(jnp.int32)
  used = group < starts.shape[0]
  g = jnp.minimum(group, starts.shape[0] - 1)
  tile_start = aligned[g] + (steps - (tile_end[g] - count[g])) * block
  base = jnp.minimum(tile_start, num_rows - block)
  first_row = jnp.maximum(starts[g], tile_start)
  hi = jnp.minimum(ends[g] - base, block)
  rows = [jnp.where(used, group, -1)] + [jnp.where(used, r, 0) for r in (base, first_row - base, hi)]
  return jnp.stack(rows).astype(jnp.int32)


def _launch(plgpu, body, operands: tuple, out_type: jax.ShapeDtypeStruct, out: jax.Array | None,
            **mesh) -> jax.Array:
  """Runs a Warpgroup-semantics kernel on every SM (`mesh`: more `plgpu.kernel` mesh arguments). With
  `out`, the kernel writes into a copy of it (passed as a mutable ref), so that elements it leaves
  unwritten keep out's values (tests poison it)."""
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  launch = functools.partial(plgpu.kernel, body, grid=(_num_sms(),), grid_names=("sm",),
                             compiler_params=params, **mesh)
  if out is None:
    return launch(out_type=out_type)(*operands)
  ref = jax.new_ref(out.astype(out_type.dtype))
  launch()(*operands, ref)
  return jax.freeze(ref)


def _store_rows(plgpu, src_smem, dst_gmem, lo: jax.Array, hi: jax.Array, max_rows: int) -> None:
  """TMA-stores rows [lo, hi) of src_smem [R, C] to the same rows of dst_gmem [R, C] (0 <= lo <= hi <= R).

  TMA copies have static shapes, so hi - lo rows go as a ladder: one copy of 2^i rows for each bit i set.
  """
  size, start, rows = hi - lo, lo, max_rows
  while rows:
    rows = 1 << (rows.bit_length() - 1)
    take = size & rows

    @pl.when(take != 0)
    def _(start=start, rows=rows):
      plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(start, rows)], dst_gmem.at[pl.ds(start, rows)])

    start, rows = start + take, rows // 2


def _gmm_kernel(schedule_gmem, x_gmem, w_gmem, out_gmem, *, tiling: GmmTiling, transpose_rhs: bool,
                num_groups: int):
  """Refs: schedule [4, T] (`tile_schedule`); x [M, R]; w [E, R, P] ([E, P, R] when transposed);
  out [M, P]."""
  plgpu = _plgpu()
  tm, tn, tk, em = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.epilogue_m
  cta_m = NUM_COMPUTE_WGS * tm
  num_rows, depth = x_gmem.shape
  width = out_gmem.shape[1]
  num_steps = schedule_gmem.shape[1]
  transforms = _swizzled(plgpu, tk, x_gmem.dtype)
  b_block, b_index = ((tn, tk), lambda k: (0, k)) if transpose_rhs else ((tk, tn), lambda k: (k, 0))

  def pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(depth // tk,), memory_registers=MEMORY_REGISTERS,
        in_specs=[plgpu.BlockSpec((cta_m, tk), lambda k: (0, k), transforms=transforms,
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec(b_block, b_index, transforms=transforms, memory_space=plgpu.SMEM)],
        wg_axis="wg", num_compute_wgs=NUM_COMPUTE_WGS, max_concurrent_steps=tiling.stages,
        compute_context=compute_context)

  w_tile = w_gmem.at[0, pl.ds(0, tn), :] if transpose_rhs else w_gmem.at[0, :, pl.ds(0, tn)]
  ignore = lambda *_, **__: None  # noqa: E731

  @functools.partial(
      pl.run_scoped,
      allocations=pipeline(ignore, ignore).get_allocations(x_gmem.at[pl.ds(0, cta_m)], w_tile),
      out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, em, tn), out_gmem.dtype),
      collective_axes="wg")
  def _scope(allocations, out_smem):
    wg = jax.lax.axis_index("wg")

    @plgpu.nd_loop((num_steps * (width // tn),), collective_axes="sm")
    def _loop(info):
      snake = tiling.grid_tile_width or width // tn
      step, col = plgpu.planar_snake(info.index[0], (num_steps, width // tn), 1, snake)
      group, base = schedule_gmem[0, step], pl.multiple_of(schedule_gmem[1, step], ROW_ALIGN)
      lo, hi = schedule_gmem[2, step], schedule_gmem[3, step]
      # The extra group (rows past the sum) stores zeros; a warpgroup none of whose rows are the group's
      # (at a group's first or last tile) skips its products.
      computes = (group < num_groups) & (lo < (wg + 1) * tm) & (hi > wg * tm)
      wg_rows = pl.ds(wg * tm, tm)
      cols = pl.ds(col * tn, tn)

      def compute_context(run_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), ACC_DTYPE))
        def _(acc_ref):
          run_pipeline(acc_ref)
          acc = acc_ref[...].astype(out_gmem.dtype)
          for chunk in range(tm // em):
            first_row = wg * tm + chunk * em  # Of this chunk in the CTA's tile.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # Earlier stores have read out_smem.
            out_smem[wg] = acc[chunk * em:(chunk + 1) * em]
            plgpu.commit_smem()
            chunk_lo = jnp.clip(lo - first_row, 0, em)
            chunk_hi = jnp.maximum(chunk_lo, jnp.clip(hi - first_row, 0, em))
            dst = out_gmem.at[pl.ds(base + first_row, em), cols]
            _store_rows(plgpu, out_smem.at[wg], dst, chunk_lo, chunk_hi, em)

      def mma(_, a_smem, b_smem, acc_ref):
        @pl.when(computes)
        def _():
          b = b_smem.T if transpose_rhs else b_smem
          plgpu.wgmma(acc_ref, a_smem.at[wg_rows], b)
          plgpu.wgmma_wait(0)
        return acc_ref

      w_group = w_gmem.at[jnp.minimum(group, num_groups - 1)]
      b_src = w_group.at[cols, :] if transpose_rhs else w_group.at[:, cols]

      @pl.when(group >= 0)
      def _():
        pipeline(mma, compute_context)(x_gmem.at[pl.ds(base, cta_m), :], b_src,
                                       allocations=allocations)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tiling: GmmTiling = GmmTiling(), *,
        transpose_rhs: bool = False, out: jax.Array | None = None) -> jax.Array:
  """Grouped matmul out[rows of g] = x[rows of g] @ w[g] (w[g]^T when transpose_rhs); other rows zero.

  Args:
    x: [M, R] bf16/fp16, rows sorted by group; M a multiple of 2 * tile_m, R of tile_k.
    w: [E, R, P], or [E, P, R] when transpose_rhs; P a multiple of tile_n.
    group_sizes: [E] int rows per group, summing to at most M.
    tiling: tile sizes.
    transpose_rhs: read w[g] as its transpose (the input gradient of the forward matmul).
    out: optional [M, P] values for elements the kernel does not write (tests poison it).

  Returns:
    [M, P] in x's dtype.
  """
  plgpu = _plgpu()
  num_rows, depth = x.shape
  width = w.shape[1] if transpose_rhs else w.shape[2]
  _check_gmm("gmm", tiling, num_rows, depth, width)
  schedule = tile_schedule(group_sizes, num_rows, NUM_COMPUTE_WGS * tiling.tile_m)
  body = functools.partial(_gmm_kernel, tiling=tiling, transpose_rhs=transpose_rhs, num_groups=w.shape[0])
  return _launch(plgpu, body, (schedule, x, w), jax.ShapeDtypeStruct((num_rows, width), x.dtype), out,
                 num_threads=NUM_COMPUTE_WGS + 1, thread_name="wg", kernel_name="grouped_matmul_mosaic")


def _row_blocks(offsets: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """[E + 1] offsets -> each group's first block of `block` rows and its number of blocks, [E] int32."""
  starts, ends = offsets[:-1], offsets[1:]
  first = starts // block
  count = jnp.where(ends > starts, (ends - 1) // block - first + 1, 0)
  return first.astype(jnp.int32), count.astype(jnp.int32)


def _tgmm_kernel(offsets_gmem, first_gmem, count_gmem, x_gmem, dy_gmem, dw_gmem, *, tiling: TgmmTiling):
  """Refs: offsets [E + 1]; first, count [E] (`_row_blocks`); x [M, K]; dy [M, N]; dw [E, K, N]."""
  plgpu = _plgpu()
  bk, bn, bm = tiling.block_k, tiling.block_n, tiling.block_m
  num_groups, depth, width = dw_gmem.shape
  num_rows = x_gmem.shape[0]
  grid_k, grid_n = depth // bk, width // bn

  @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
  def _loop(info):
    g = info.index[0]
    ki, ni = plgpu.planar_snake(info.index[1], (grid_k, grid_n), 1, tiling.grid_tile_width)
    start, end = offsets_gmem[g], offsets_gmem[g + 1]
    first, count = first_gmem[g], count_gmem[g]
    rows = pl.ds(pl.multiple_of(first * bm, bm), num_rows)  # Reads stop at the group's last block.

    def mask_rows(smem, keep):
      """Zeroes the rows of a [bm, C] block outside the group (keep: [bm, C] bool from row indices)."""
      smem[...] = jnp.where(keep, smem[...], jnp.zeros((), smem.dtype))
      plgpu.commit_smem()

    def step(idx, x_smem, dy_smem, acc_ref):
      (i,) = idx
      row = (first + i) * bm

      @pl.when((i == 0) | (i == count - 1))
      def _():
        for smem in (x_smem, dy_smem):  # Both, so that non-finite rows of other groups drop out too.
          index = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, smem.shape, 0), plgpu.Layout.WGMMA)
          mask_rows(smem, (index + row >= start) & (index + row < end))

      plgpu.wgmma(acc_ref, x_smem.T, dy_smem)
      plgpu.wgmma_wait(0)

    def acc_scope(acc_ref):
      @pl.when(count > 0)
      def _():
        plgpu.emit_pipeline(
            functools.partial(step, acc_ref=acc_ref), grid=(count,),
            in_specs=[
                plgpu.BlockSpec((bm, bk), lambda i: (i, ki), transforms=_swizzled(plgpu, bk, x_gmem.dtype)),
                plgpu.BlockSpec((bm, bn), lambda i: (i, ni), transforms=_swizzled(plgpu, bn, dy_gmem.dtype))],
            max_concurrent_steps=tiling.stages)(x_gmem.at[rows], dy_gmem.at[rows])
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), ACC_DTYPE))

    @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bk, bn), dw_gmem.dtype,
                                                          transforms=_swizzled(plgpu, bn, dw_gmem.dtype)))
    def _(out_smem):
      out_smem[...] = acc.astype(out_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, dw_gmem.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, tiling: TgmmTiling = TgmmTiling(),
         dtype: jnp.dtype | None = None, *, out: jax.Array | None = None) -> jax.Array:
  """Transposed grouped matmul dw[e] = x_e^T dy_e over each group's rows; zero for empty groups.

  Args:
    x: [M, K] bf16/fp16, rows sorted by group; K a multiple of block_k.
    dy: [M, N], same rows; N a multiple of block_n.
    group_sizes: [E] int rows per group, summing to at most M.
    tiling: tile sizes.
    dtype: dtype of the result (x's by default).
    out: optional [E, K, N] values for elements the kernel does not write (tests poison it).

  Returns:
    [E, K, N].
  """
  plgpu = _plgpu()
  (num_rows, depth), width = x.shape, dy.shape[1]
  _check_tgmm(tiling, depth, width)
  offsets = group_offsets(group_sizes, num_rows)
  first, count = _row_blocks(offsets, tiling.block_m)
  out_type = jax.ShapeDtypeStruct((group_sizes.shape[0], depth, width), dtype or x.dtype)
  return _launch(plgpu, functools.partial(_tgmm_kernel, tiling=tiling), (offsets, first, count, x, dy),
                 out_type, out, kernel_name="grouped_matmul_weight_grad_mosaic")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   config: Config = Config()) -> jax.Array:
  """x [M, K] (rows sorted by group) @ w [E, K, N] per group -> [M, N] in x's dtype; fp32 accumulation.

  Rows past sum(group_sizes) give zeros. Both gradients are grouped kernels (`Config`).
  """
  return gmm(x, w, group_sizes, config.forward)


def _grouped_matmul_fwd(x, w, group_sizes, config):
  return gmm(x, w, group_sizes, config.forward), (x, w, group_sizes)


def _grouped_matmul_bwd(config, residuals, dy):
  x, w, group_sizes = residuals
  dx = gmm(dy, w, group_sizes, config.input_grad, transpose_rhs=True)
  if isinstance(config.weight_grad, TgmmTiling):
    dw = tgmm(x, dy, group_sizes, config.weight_grad, w.dtype)
  else:
    offsets = group_offsets(group_sizes, x.shape[0])
    dw = grouped_matmul_pallas.tgmm(x, dy, offsets, config.weight_grad, w.dtype)
  return dx, dw, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
