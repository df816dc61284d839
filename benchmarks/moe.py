"""MoE benchmark: the A0.3B-2B expert grouped matmul and the whole MoE layer on the GPU (issue #6, part 7).

Kernel rows: one grouped matmul [tokens * top_k, d_model] x [experts, d_model, d_ff] through each of
--impls (`jax.lax.ragged_dot`, the Pallas (Triton) kernels, the Mosaic GPU kernels), and a dense XLA
matmul of the same FLOPs, forward and forward+backward, with even groups and with one expert holding
10x its share.
Layer rows (--layers): the MoE layer (router, permutation, three expert matmuls, combine) as training
runs it (bf16 compute, expert weights stored in bf16: `model.moe.expert_param_dtype`), dropless with the
grouped matmul "auto" picks (also with fp32 expert weights cast in every call, and through each other
implementation --impls names), in capacity mode (factor 1.25), and a dense SwiGLU MLP of the same
active FLOPs (d_ff = top_k * expert d_ff), with the compiled forward+backward's memory.
Prints tables and writes JSON to --out.

  python3 -m benchmarks.moe --out moe.json [--sweep] [--layers] [--hlo-dir DIR]
"""

import argparse
import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_ms
from linmoe import kernels
from linmoe.config import ModelConfig, default_config
from linmoe.kernels import grouped_matmul_mosaic as gmm_mosaic
from linmoe.kernels import grouped_matmul_pallas as gmp
from linmoe.kernels.grouped_matmul import auto_impl
from linmoe.layers import moe as moe_layer
from linmoe.layers.mlp import SwiGLU
from linmoe.layers.moe import MoE
from linmoe.model import init_params

SKEW = 10  # The skewed layout gives one expert SKEW times its even share.
# Tilings tried by --sweep (block_m, block_n, block_k, num_warps, num_stages): forward (and dx) kernel,
# then weight-gradient kernel.
SWEEP_FORWARD = [gmp.Tiling(*t) for t in [
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4),
    (128, 256, 128, 8, 2)]]
SWEEP_WEIGHT_GRAD = [gmp.Tiling(*t) for t in [
    (64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3),
    (32, 128, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 256, 8, 3)]]


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


def forward_and_backward(matmul: Callable) -> Callable:
  """(x, w, cotangent) -> (out, dx, dw) of matmul(x, w)."""
  def run(x, w, cotangent):
    out, vjp = jax.vjp(matmul, x, w)
    return (out, *vjp(cotangent))
  return jax.jit(run)


def run_table(shape: Shape, dtype: jnp.dtype, impls: list[str]) -> list[dict]:
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
    for impl in impls:
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
        ms = time_ms(fn, *args, layout_offsets, budget_s=0.3)
      except Exception as e:  # A tiling Triton cannot compile (e.g. out of shared memory) is reported.
        print(f"  sweep {kernel} {tiling}: failed: {str(e)[:300]}", flush=True)
        break
      tflops = shape.forward_flops / ms / 1e9
      rows.append({"kernel": kernel, "layout": layout, "tiling": dataclasses.asdict(tiling), "ms": ms,
                   "tflops": tflops})
      print(f"  sweep {kernel:<3} {layout:<7} {tiling}: {ms:.3f} ms {tflops:.1f} TFLOP/s", flush=True)
  return rows


def layer_config(shape: Shape, dispatch: str, gmm_impl: str, expert_param_dtype: str = "bfloat16"
                 ) -> ModelConfig:
  """The MoE layer of `shape` in bf16 (softmax router, top-k renormalized, no shared expert), its
  expert weights stored in `expert_param_dtype` (bf16 as the A0.3B-2B preset trains)."""
  m = default_config().model
  m.d_model, m.compute_dtype = shape.d_model, "bfloat16"
  m.moe.update(num_experts=shape.experts, top_k=shape.top_k, d_ff=shape.d_ff, dispatch=dispatch,
               gmm_impl=gmm_impl, capacity_factor_train=1.25, expert_param_dtype=expert_param_dtype)
  return ModelConfig.from_config(m, 128)


def memory_mib(compiled) -> dict:
  """Sizes from the compiled program's memory analysis, in MiB: temporaries (the peak working memory
  beside arguments and outputs), arguments, outputs."""
  mem = compiled.memory_analysis()
  mib = lambda b: round(b / 2**20, 1)
  return {"temp_mib": mib(mem.temp_size_in_bytes), "argument_mib": mib(mem.argument_size_in_bytes),
          "output_mib": mib(mem.output_size_in_bytes)}


def large_arrays(hlo: str, shapes: dict[str, str]) -> dict[str, list[str]]:
  """The instructions of the optimized HLO's entry computation (a fusion counts once) that produce an
  array of each named shape, e.g. {"[tokens*k, d_model]": "131072,1024"}, as "dtype: op_name"."""
  entry = hlo[hlo.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  found = {name: [] for name in shapes}
  for line in entry.splitlines()[1:]:
    if "=" not in line:
      continue
    result = line.split("=", 1)[1].split("(", 1)[0].strip()
    op_name = line.split('op_name="', 1)[1].split('"', 1)[0] if 'op_name="' in line else "?"
    for name, dims in shapes.items():
      if f"[{dims}]" in result:
        found[name].append(f"{result.split('[', 1)[0]}: {op_name}")
  return found


def run_layers(shape: Shape, dtype: jnp.dtype, hlo_dir: str | None, impls: list[str]) -> list[dict]:
  """Forward and forward+backward ms, TFLOP/s (active expert FLOPs), compiled memory and, for the MoE
  layers, the count of [tokens, experts] and [tokens * k, d_model] arrays in the optimized HLO.

  The MoE layers run as the A0.3B-2B preset trains them: bf16 compute, expert weights stored in bf16
  (`model.moe.expert_param_dtype`, fp32 masters in the optimizer, outside the layer); one row keeps
  fp32 expert weights, cast to bf16 in every call. The dense MLP's weights are fp32 as in training.
  `impls`: also the dropless layer through each of these grouped matmuls other than the one "auto" picks
  (plain ragged_dot is slow; its backward runs out of memory).
  """
  kx, kc, kp = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (1, shape.tokens, shape.d_model), dtype)
  cotangent = jax.random.normal(kc, x.shape, dtype)
  flops = 3 * shape.forward_flops  # three expert projections
  big = {"[tokens, experts]": f"{shape.tokens},{shape.experts}",
         "[tokens*k, d_model]": f"{shape.rows},{shape.d_model}"}
  layers = [
      ("moe dropless, ours", MoE(layer_config(shape, "dropless", "auto"))),
      ("moe dropless, fp32 experts", MoE(layer_config(shape, "dropless", "auto", "float32"))),
      ("moe capacity 1.25", MoE(layer_config(shape, "capacity", "auto"))),
      ("dense swiglu", SwiGLU(layer_config(shape, "dropless", "auto"), d_ff=shape.top_k * shape.d_ff)),
  ]
  for impl in [i for i in impls if i != auto_impl(dtype)]:
    layers.insert(2, (f"moe dropless, {impl}", MoE(layer_config(shape, "dropless", impl))))
  # Diagnostic: the dropless layer with its expert function replaced by the identity, i.e. the router,
  # permutation and combine alone (the expert weights then get no gradient).
  layers.append(("moe dropless, no experts", MoE(layer_config(shape, "dropless", "auto"))))
  rows = []
  for name, layer in layers:
    params = init_params(layer, kp, x)
    with contextlib.ExitStack() as stack:
      if name.endswith("no experts"):
        stack.enter_context(mock.patch.object(moe_layer, "grouped_swiglu", lambda xs, *_: xs))
      rows += _time_layer(name, layer, params, x, cotangent, flops, big, hlo_dir)
  return rows


def _time_layer(name: str, layer, params, x: jax.Array, cotangent: jax.Array, flops: float,
                big: dict[str, str], hlo_dir: str | None) -> list[dict]:
  """The forward and forward+backward rows of one layer (see `run_layers`)."""
  rows = []
  apply = lambda p, a, layer=layer: jax.tree.leaves(layer.apply({"params": p}, a))[0]

  def forward_backward(p, a, apply=apply):
    out, vjp = jax.vjp(apply, p, a)
    return out, vjp(cotangent)

  for mode, fn, mode_flops in [("fwd", jax.jit(apply), flops),
                               ("fwd+bwd", jax.jit(forward_backward), 3 * flops)]:
    row = {"layer": name, "mode": mode}
    try:
      compiled = fn.lower(params, x).compile()
      row.update(memory_mib(compiled))
      if name.startswith("moe"):
        hlo = compiled.as_text()
        row["hlo_arrays"] = large_arrays(hlo, big)
        if hlo_dir:
          with open(f"{hlo_dir}/{name.replace(' ', '_').replace(',', '')}_{mode}.hlo.txt", "w") as f:
            f.write(hlo)
      row["ms"] = time_ms(compiled, params, x)
    except jax.errors.JaxRuntimeError as e:  # ragged_dot's backward can run out of memory.
      rows.append({**row, "error": str(e).splitlines()[0]})
      print(f"  {name:<26} {mode:<8} failed: {rows[-1]['error'][:200]}", flush=True)
      continue
    rows.append({**row, "tflops": mode_flops / row["ms"] / 1e9})
    print(f"  {name:<26} {mode:<8} {row['ms']:8.3f} ms {rows[-1]['tflops']:6.1f} TFLOP/s "
          f"temp {row['temp_mib']} MiB", flush=True)
    for shape_name, found in row.get("hlo_arrays", {}).items():
      print(f"    {len(found)} x {shape_name}: {'; '.join(found)}", flush=True)
  return rows


def print_layers(rows: list[dict]) -> None:
  """One line per row of `run_layers`, with its time relative to the dense SwiGLU MLP's."""
  dense = {r["mode"]: r["ms"] for r in rows if r["layer"] == "dense swiglu" and "ms" in r}
  print(f"{'layer':<26} {'mode':<8} {'ms':>8} {'TFLOP/s':>8} {'x dense':>8} {'temp MiB':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['layer']:<26} {r['mode']:<8} failed: {r['error'][:60]}")
      continue
    ratio = r["ms"] / dense[r["mode"]] if r["mode"] in dense else float("nan")
    print(f"{r['layer']:<26} {r['mode']:<8} {r['ms']:8.3f} {r['tflops']:8.1f} {ratio:8.2f} "
          f"{r['temp_mib']:9.1f}")


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
  parser.add_argument("--impls", default="ragged_dot,pallas,mosaic",
                      help="grouped matmuls of the kernel rows")
  parser.add_argument("--layers", action="store_true", help="also time the whole MoE layer")
  parser.add_argument("--hlo-dir", help="write the MoE layers' optimized HLO here")
  parser.add_argument("--out", help="JSON file for the results")
  args = parser.parse_args()
  shape = Shape(args.tokens, args.top_k, args.experts, args.d_model, args.d_ff)
  dtype = jnp.dtype(args.dtype)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {shape}, {dtype}", flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "shape": dataclasses.asdict(shape), "dtype": dtype.name,
            "config": dataclasses.asdict(gmp.Config()),
            "mosaic_config": dataclasses.asdict(gmm_mosaic.Config())}
  if args.sweep:
    result["sweep"] = run_sweep(shape, dtype)
  result["rows"] = run_table(shape, dtype, args.impls.split(","))
  if args.layers:
    result["layers"] = run_layers(shape, dtype, args.hlo_dir, args.impls.split(","))
  print_table(result["rows"])
  if args.layers:
    print_layers(result["layers"])
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
