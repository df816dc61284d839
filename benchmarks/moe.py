"""MoE benchmark: the expert grouped matmul of the A0.3B-2B layer on the GPU (issue #6, part 7).

Times one grouped matmul [tokens * top_k, d_model] x [experts, d_model, d_ff] through `jax.lax.ragged_dot`
and the Pallas kernel, and a dense XLA matmul of the same FLOPs, forward and forward+backward, with even
groups and with one expert holding 10x its share. Prints a table and writes JSON to --out.

  python3 benchmarks/moe.py --out moe.json [--sweep]
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linmoe import kernels
from linmoe.kernels import grouped_matmul_pallas as gmp

SKEW = 10  # The skewed layout gives one expert SKEW times its even share.
# Tilings tried by --sweep (block_m, block_n, block_k, num_warps, num_stages): forward (and dx) kernel,
# then weight-gradient kernel.
SWEEP_FORWARD = [gmp.Tiling(*t) for t in [
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 3), (128, 128, 64, 8, 4)]]
SWEEP_WEIGHT_GRAD = [gmp.Tiling(*t) for t in [
    (64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 128, 128, 4, 3), (32, 128, 128, 4, 4),
    (64, 256, 128, 8, 3)]]


@dataclasses.dataclass(frozen=True)
class Shape:
  """The grouped matmul of one expert projection: [rows, d_model] x [experts, d_model, d_ff]."""
  tokens: int
  top_k: int
  experts: int
  d_model: int
  d_ff: int

  @property
  def rows(self) -> int:
    return self.tokens * self.top_k

  @property
  def forward_flops(self) -> float:
    return 2.0 * self.rows * self.d_model * self.d_ff


def group_sizes(shape: Shape, layout: str) -> np.ndarray:
  """[experts] int32 sizes summing to rows: "even", or "skewed" (expert 0 gets SKEW times its share)."""
  share = shape.rows // shape.experts
  first = share * SKEW if layout == "skewed" else share
  rest, extra = divmod(shape.rows - first, shape.experts - 1)
  sizes = np.full(shape.experts, rest, np.int32)
  sizes[0] = first
  sizes[1:1 + extra] += 1
  return sizes


def time_ms(fn: Callable, *args, budget_s: float = 1.5, max_batches: int = 9) -> float:
  """Median ms per call of fn(*args), timed in batches of async calls (one sync per batch)."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  per_batch = max(1, min(50, int(0.05 / max(once, 1e-6))))
  num_batches = int(max(3, min(max_batches, budget_s / (once * per_batch))))
  times = []
  for _ in range(num_batches):
    start = time.perf_counter()
    for _ in range(per_batch):
      out = fn(*args)
    jax.block_until_ready(out)  # One stream: the last call ends after the others.
    times.append((time.perf_counter() - start) / per_batch)
  return 1e3 * statistics.median(times)


def forward_and_backward(matmul: Callable) -> Callable:
  """(x, w, cotangent) -> (out, dx, dw) of matmul(x, w)."""
  def run(x, w, cotangent):
    out, vjp = jax.vjp(matmul, x, w)
    return (out, *vjp(cotangent))
  return jax.jit(run)


def run_table(shape: Shape, dtype: jnp.dtype) -> list[dict]:
  """Forward and forward+backward ms and TFLOP/s of each implementation and group layout."""
  kx, kw, kd, kc = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (shape.rows, shape.d_model), dtype)
  w = jax.random.normal(kw, (shape.experts, shape.d_model, shape.d_ff), dtype)
  w_dense = jax.random.normal(kd, (shape.d_model, shape.d_ff), dtype)
  cotangent = jax.random.normal(kc, (shape.rows, shape.d_ff), dtype)
  rows = []

  def add(impl: str, layout: str, matmul: Callable, weights: jax.Array) -> None:
    for mode, fn, args, flops in [
        ("fwd", jax.jit(matmul), (x, weights), shape.forward_flops),
        ("fwd+bwd", forward_and_backward(matmul), (x, weights, cotangent), 3 * shape.forward_flops)]:
      row = {"impl": impl, "layout": layout, "mode": mode}
      try:
        row["ms"] = time_ms(fn, *args)
      except jax.errors.JaxRuntimeError as e:  # ragged_dot's backward can run out of memory.
        rows.append({**row, "error": str(e).splitlines()[0]})
        print(f"  {impl:<10} {layout:<7} {mode:<8} failed: {rows[-1]['error']}", flush=True)
        continue
      rows.append({**row, "tflops": flops / row["ms"] / 1e9})
      print(f"  {impl:<10} {layout:<7} {mode:<8} {row['ms']:9.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s",
            flush=True)

  add("dense", "-", jnp.matmul, w_dense)
  for layout in ("even", "skewed"):
    sizes = jnp.asarray(group_sizes(shape, layout))
    for impl in ("ragged_dot", "pallas"):
      add(impl, layout, functools.partial(kernels.grouped_matmul, group_sizes=sizes, impl=impl), w)
  return rows


def run_sweep(shape: Shape, dtype: jnp.dtype) -> list[dict]:
  """ms of each tiling for the three kernels (out, dx, dw) with even and skewed groups."""
  kx, kw, kc = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (shape.rows, shape.d_model), dtype)
  w = jax.random.normal(kw, (shape.experts, shape.d_model, shape.d_ff), dtype)
  dy = jax.random.normal(kc, (shape.rows, shape.d_ff), dtype)
  offsets = {layout: gmp.group_offsets(jnp.asarray(group_sizes(shape, layout)), shape.rows)
             for layout in ("even", "skewed")}
  cases = [("out", t, functools.partial(gmp.gmm, tiling=t), (x, w)) for t in SWEEP_FORWARD]
  cases += [("dx", t, functools.partial(gmp.gmm, tiling=t, transpose_rhs=True), (dy, w))
            for t in SWEEP_FORWARD]
  cases += [("dw", t, functools.partial(gmp.tgmm, tiling=t, dtype=dtype), (x, dy))
            for t in SWEEP_WEIGHT_GRAD]
  rows = []
  for kernel, tiling, fn, args in cases:
    fn = jax.jit(fn)
    for layout, layout_offsets in offsets.items():
      try:
        ms = time_ms(fn, *args, layout_offsets, budget_s=0.5)
      except Exception as e:  # A tiling Triton cannot compile (e.g. out of shared memory) is reported.
        print(f"  sweep {kernel} {tiling}: failed: {str(e)[:300]}", flush=True)
        break
      tflops = shape.forward_flops / ms / 1e9
      rows.append({"kernel": kernel, "layout": layout, "tiling": dataclasses.asdict(tiling), "ms": ms,
                   "tflops": tflops})
      print(f"  sweep {kernel:<3} {layout:<7} {tiling}: {ms:.3f} ms {tflops:.1f} TFLOP/s", flush=True)
  return rows


def print_table(rows: list[dict]) -> None:
  """One line per row of `run_table`, with its TFLOP/s as a share of the dense matmul's."""
  dense = {r["mode"]: r["tflops"] for r in rows if r["impl"] == "dense"}
  print(f"{'impl':<10} {'groups':<7} {'mode':<8} {'ms':>9} {'TFLOP/s':>8} {'% dense':>8}")
  for r in rows:
    if "error" in r:
      print(f"{r['impl']:<10} {r['layout']:<7} {r['mode']:<8} failed: {r['error'][:60]}")
      continue
    share = 100 * r["tflops"] / dense[r["mode"]]
    print(f"{r['impl']:<10} {r['layout']:<7} {r['mode']:<8} {r['ms']:9.3f} {r['tflops']:8.1f} {share:7.0f}%")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--top-k", type=int, default=8)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--d-model", type=int, default=1024)
  parser.add_argument("--d-ff", type=int, default=896)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--sweep", action="store_true", help="also time the Pallas tilings of SWEEP_*")
  parser.add_argument("--out", help="JSON file for the results")
  args = parser.parse_args()
  shape = Shape(args.tokens, args.top_k, args.experts, args.d_model, args.d_ff)
  dtype = jnp.dtype(args.dtype)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {shape}, {dtype}", flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "shape": dataclasses.asdict(shape), "dtype": dtype.name,
            "config": dataclasses.asdict(gmp.Config())}
  if args.sweep:
    result["sweep"] = run_sweep(shape, dtype)
  result["rows"] = run_table(shape, dtype)
  print_table(result["rows"])
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
