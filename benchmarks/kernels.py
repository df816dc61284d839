"""Kernel benchmark: simple_gla, gla, delta_rule and gated delta_rule (ours: chunked, pallas;
flash-linear-attention 0.6.0), cuDNN attention.

For each (batch, seq) shape, heads 8, head dim 128, bf16 inputs (fp32 log decays; the delta rule's keys L2
normalised, beta in (0, 1)): the median milliseconds per call (calls queued as training issues them:
benchmarks/timing.py) of the forward pass and of forward + backward (the vjp of o under a random cotangent, every
input's gradient). "pallas_packed" is "pallas" on the same shapes packed with documents: segment ids with a
boundary at PACKED_DOC_LEN - 1 random tokens of every row on average (documents of random lengths,
PACKED_DOC_LEN on average), to compare with the unpacked rows.
flash-linear-attention runs in a PyTorch subprocess, started before JAX takes the GPU; cuDNN attention is
`jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`; with "pallas_packed" and "cudnn" both
asked, attention on the packed rows too (`causal_attention` with segment ids: JAX's Pallas flash kernel).

  python3 -m benchmarks.kernels --out results.json [--shapes 8x2048,1x65536] [--impls pallas,fla] [--reps 9]
      [--families delta_rule,gated_delta_rule] [--breakdown 1x16384] [--chunk-sizes 64,128] [--delta-split]
"""

import argparse
import functools
import json
import subprocess
import sys
from collections.abc import Callable, Sequence

SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 65536))
HEADS, DIM = 8, 128
FAMILIES = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
# Each family's inputs after q, k, v, in the order of our op (fla's differs: `_fla_args`).
EXTRA_INPUTS = {"simple_gla": ("g",), "gla": ("g",), "delta_rule": ("beta",), "gated_delta_rule": ("beta", "g")}
OUR_IMPLS = ("chunked", "pallas", "pallas_packed")
PACKED_DOC_LEN = 1024
ALL_IMPLS = (*OUR_IMPLS, "fla", "cudnn")


def _parse_shapes(text: str) -> list[tuple[int, int]]:
  """"8x2048,1x65536" -> [(8, 2048), (1, 65536)]."""
  return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]


def _row(op: str, impl: str, batch: int, seq: int, times: dict, chunk: int | None = None) -> dict:
  """One result; `chunk`: our ops' chunk size (None for fla and attention)."""
  return {"op": op, "impl": impl, "batch": batch, "seq": seq, "chunk": chunk, **times}


def _timed(measure: Callable[[], float]) -> dict:
  """{"ms": median ms} or {"error": message}: one failing case does not stop the others."""
  try:
    return {"ms": measure()}
  except Exception as e:  # noqa: BLE001 - a benchmark reports failures, whatever they are.
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _both(fwd: Callable[[], float], fwd_bwd: Callable[[], float]) -> dict:
  f, fb = _timed(fwd), _timed(fwd_bwd)
  return {"fwd_ms": f.get("ms"), "fwd_bwd_ms": fb.get("ms"),
          "error": "; ".join(r["error"] for r in (f, fb) if "error" in r) or None}


def fla_worker(shapes: Sequence[tuple[int, int]], families: Sequence[str], warmup_ms: int, rep_ms: int) -> None:
  """Prints one JSON row per case: flash-linear-attention timed by triton.testing.do_bench (median, events)."""
  import torch  # noqa: PLC0415 - only in the subprocess.
  import torch.nn.functional as F  # noqa: N812, PLC0415
  import triton  # noqa: PLC0415
  from fla.ops.delta_rule import chunk_delta_rule  # noqa: PLC0415
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: PLC0415
  from fla.ops.gla import chunk_gla  # noqa: PLC0415
  from fla.ops.simple_gla import chunk_simple_gla  # noqa: PLC0415

  ops = {"simple_gla": chunk_simple_gla, "gla": chunk_gla, "delta_rule": chunk_delta_rule,
         "gated_delta_rule": chunk_gated_delta_rule}
  # fla's argument order: the gate before beta.
  fla_order = {"simple_gla": ("g",), "gla": ("g",), "delta_rule": ("beta",), "gated_delta_rule": ("g", "beta")}
  for phase in ("fwd_ms", "fwd_bwd_ms"):  # Every forward first: the slow autotuning of the backward comes last.
    for batch, seq in shapes:
      for op_name in families:
        op = ops[op_name]
        make = lambda *s, dtype=torch.bfloat16: torch.randn(*s, dtype=dtype, device="cuda")  # noqa: E731
        q, k, v = (make(batch, seq, HEADS, DIM) for _ in range(3))
        if op_name in ("delta_rule", "gated_delta_rule"):
          k = F.normalize(k.float(), dim=-1).to(torch.bfloat16)
        g_shape = (batch, seq, HEADS, DIM) if op_name == "gla" else (batch, seq, HEADS)
        extra = {"g": F.logsigmoid(make(*g_shape, dtype=torch.float32)),
                 "beta": torch.sigmoid(make(batch, seq, HEADS))}
        inputs = [x.requires_grad_() for x in (q, k, v, *(extra[n] for n in fla_order[op_name]))]
        do = make(batch, seq, HEADS, DIM)

        def fwd(op=op, inputs=inputs):
          return op(*inputs)[0]

        def fwd_bwd(fwd=fwd, inputs=inputs, do=do):
          return torch.autograd.grad(fwd(), inputs, do)

        fn = fwd if phase == "fwd_ms" else fwd_bwd
        timed = _timed(lambda fn=fn: triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                             return_mode="median"))
        times = {phase: timed.get("ms"), "error": timed.get("error")}
        print(json.dumps(_row(op_name, "fla", batch, seq, times)), flush=True)
        del inputs, do
        torch.cuda.empty_cache()


def _run_fla(shapes: Sequence[tuple[int, int]], families: Sequence[str], warmup_ms: int, rep_ms: int,
             timeout_s: float) -> list[dict]:
  """fla_worker in a subprocess (its own CUDA context); the cases it did not report carry an error."""
  shapes_arg = ",".join(f"{b}x{t}" for b, t in shapes)
  cmd = [sys.executable, __file__, "--fla-worker", "--shapes", shapes_arg, "--families", ",".join(families),
         "--warmup-ms", str(warmup_ms), "--rep-ms", str(rep_ms)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    stdout, error = proc.stdout, (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
  except subprocess.TimeoutExpired as e:
    stdout, error = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"
  merged = {(op, b, t): _row(op, "fla", b, t, {"fwd_ms": None, "fwd_bwd_ms": None, "error": None})
            for b, t in shapes for op in families}
  for part in (json.loads(line) for line in stdout.splitlines() if line.startswith("{")):
    row = merged[(part["op"], part["batch"], part["seq"])]
    row.update({key: value for key, value in part.items() if key in ("fwd_ms", "fwd_bwd_ms")})
    row["error"] = "; ".join(e for e in (row["error"], part["error"]) if e) or None
  rows = list(merged.values())
  for row in rows:
    if None in (row["fwd_ms"], row["fwd_bwd_ms"]) and not row["error"]:
      row["error"] = error
    print(json.dumps(row), flush=True)
  return rows


def _packed_segment_ids(batch: int, seq: int, seed: int):
  """[batch, seq] int32 document ids: each row cut at seq // PACKED_DOC_LEN - 1 distinct random tokens."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  n_cuts = max(seq // PACKED_DOC_LEN - 1, 0)
  rows = [np.searchsorted(np.sort(rng.choice(np.arange(1, seq), n_cuts, replace=False)), np.arange(seq),
                          side="right") for _ in range(batch)]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _output_and_grads(out: Callable, *args):
  """out(*args[:-1]) and its vjp under the cotangent args[-1]. The output is returned so that the forward pass
  is timed too: a custom_vjp whose residuals are its inputs would otherwise have its forward kernels removed
  as dead code."""
  import jax  # noqa: PLC0415

  o, vjp = jax.vjp(out, *args[:-1])
  return o, vjp(args[-1])


def _jax_rows(shapes: Sequence[tuple[int, int]], families: Sequence[str], impls: Sequence[str],
              reps: int, chunk_sizes: Sequence[int], delta_split: bool, on_row: Callable[[dict], None]) -> None:
  """Our impls (of `impls`) of `families` at each of `chunk_sizes`, and cuDNN attention if "cudnn" is in
  `impls` (with "pallas_packed" too: attention on the packed rows, `causal_attention` with segment ids).
  With `delta_split`, the delta rule's Pallas rows again with its scans split into runs (impl "..._split").
  Each row is printed as JSON and handed to `on_row` as it is measured."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from benchmarks.timing import time_ms  # noqa: PLC0415
  from linmoe import kernels  # noqa: PLC0415
  from linmoe.kernels.pallas import delta as pallas_delta  # noqa: PLC0415
  from linmoe.layers.attention import causal_attention  # noqa: PLC0415

  ops = {"simple_gla": kernels.simple_gla, "gla": kernels.gla, "delta_rule": kernels.delta_rule,
         "gated_delta_rule": kernels.delta_rule}
  for batch, seq in shapes:
    keys = jax.random.split(jax.random.key(batch * seq), 8)
    q, k, v, do = (jax.random.normal(key, (batch, seq, HEADS, DIM), jnp.bfloat16) for key in keys[:4])
    unit_k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
    extra = {"simple_gla": {"g": jax.nn.log_sigmoid(jax.random.normal(keys[4], (batch, seq, HEADS)))},
             "gla": {"g": jax.nn.log_sigmoid(jax.random.normal(keys[5], (batch, seq, HEADS, DIM)))},
             "delta_rule": {"beta": jax.nn.sigmoid(jax.random.normal(keys[6], (batch, seq, HEADS), jnp.bfloat16))}}
    extra["gated_delta_rule"] = extra["delta_rule"] | extra["simple_gla"]
    packed = {"segment_ids": _packed_segment_ids(batch, seq, seed=seq)}
    for op_name, chunk in ((o, c) for o in families for c in chunk_sizes):
      splits = (False, True) if delta_split and "delta" in op_name else (False,)
      for impl, split in ((i, s) for i in OUR_IMPLS if i in impls for s in splits if i != "chunked" or not s):
        op = functools.partial(ops[op_name], chunk_size=chunk, **(packed if impl == "pallas_packed" else {}))
        op_impl = "pallas" if impl == "pallas_packed" else impl
        out = lambda *a, op=op, impl=op_impl: op(*a, impl=impl)[0]  # noqa: E731
        fwd = jax.jit(out)
        fwd_bwd = jax.jit(functools.partial(_output_and_grads, out))
        args = (q, unit_k if "delta" in op_name else k, v, *(extra[op_name][n] for n in EXTRA_INPUTS[op_name]))
        pallas_delta.SPLIT_SCANS = split  # read when the calls are traced, inside time_ms
        row = _row(op_name, impl + "_split" * split, batch, seq, _both(
            lambda: time_ms(fwd, *args, max_batches=reps),
            lambda: time_ms(fwd_bwd, *args, do, max_batches=reps)), chunk)
        pallas_delta.SPLIT_SCANS = False
        print(json.dumps(row), flush=True)
        on_row(row)
    if "cudnn" not in impls:
      continue
    attentions = {"cudnn": functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                             implementation="cudnn")}
    if "pallas_packed" in impls:  # causal_attention with segment ids: JAX's Pallas flash kernel on a GPU
      attentions["pallas_packed"] = functools.partial(causal_attention, **packed)
    for impl, attention in attentions.items():
      fwd = jax.jit(attention)
      fwd_bwd = jax.jit(functools.partial(_output_and_grads, attention))
      row = _row("attention", impl, batch, seq, _both(
          lambda: time_ms(fwd, q, k, v, max_batches=reps),
          lambda: time_ms(fwd_bwd, q, k, v, do, max_batches=reps)))
      print(json.dumps(row), flush=True)
      on_row(row)


def _breakdown_rows(batch: int, seq: int, reps: int) -> list[dict]:
  """Median ms of each Pallas kernel of simple_gla's and gla's forward and backward, on its own (bf16, C 64,
  c 16).

  The chunk scan also runs with other value blocks and pipelining depths, and as one walk (runs=1), and gla's
  intra-chunk kernels with 4 and 8 warps, to show where their time goes.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from linmoe.kernels.pallas import grads, intra, output, state  # noqa: PLC0415

  chunk, sub, block, scale = 64, 16, 64, DIM**-0.5
  keys = jax.random.split(jax.random.key(seq), 6)
  q, k, v, do = (jax.random.normal(key, (batch, seq, HEADS, DIM), jnp.bfloat16) for key in keys[:4])
  h0 = jnp.zeros((batch, HEADS, DIM, DIM), jnp.float32)

  def cumulative(g):  # The within-chunk cumulative log decay the kernels take.
    g = jax.nn.log_sigmoid(g).reshape(batch, seq // chunk, chunk, HEADS, -1)
    return jnp.cumsum(g, axis=2).reshape(batch, seq, HEADS, -1)

  rows = []
  for op_name, b in (("simple_gla", cumulative(jax.random.normal(keys[4], (batch, seq, HEADS)))),
                     ("gla", cumulative(jax.random.normal(keys[5], (batch, seq, HEADS, DIM))))):
    scan = functools.partial(state.chunk_scan, chunk=chunk, block_k=block)
    states, _ = jax.jit(functools.partial(scan, reverse=False, factor=1.0, block_v=block))(k, v, b, h0)
    d_states, _ = jax.jit(functools.partial(scan, reverse=True, factor=scale, block_v=block))(q, do, b, h0)
    vector = op_name == "gla"
    scores = intra.intra_scores(q, k, b, chunk=chunk, sub=sub) if vector else None
    stages = {
        f"chunk_scan bv{bv} stages{ns}": (functools.partial(scan, reverse=False, factor=1.0, block_v=bv,
                                                             num_stages=ns), (k, v, b, h0))
        for bv in (32, 64) for ns in (2, 3, 4)}
    stages["chunk_scan_bwd"] = (functools.partial(scan, reverse=True, factor=scale, block_v=block),
                                (q, do, b, h0))
    for reverse, args in ((False, (k, v, b, h0)), (True, (q, do, b, h0))):  # one walk, not split into runs
      stages[f"chunk_scan{'_bwd' if reverse else ''} runs1"] = (
          functools.partial(scan, reverse=reverse, factor=scale if reverse else 1.0, block_v=block, runs=1), args)
    stages["chunk_outputs"] = (functools.partial(output.chunk_outputs, scale=scale, chunk=chunk, block_v=block),
                               (q, k, v, b, states, scores))
    stages["value_grad"] = (functools.partial(grads.value_grad, scale=scale, chunk=chunk, block_v=block,
                                              dtype=v.dtype), (q, k, b, do, d_states, scores))
    key_grads = functools.partial(grads.query_key_grads, scale=scale, chunk=chunk, block_k=block)
    stages["query_key_grads"] = key_grads, (q, k, v, do, b, states, d_states)
    if vector:
      for warps in (4, 8):  # intra kernels hold [C, K] fp32 tiles: do more warps relieve their registers?
        stages[f"intra_scores warps{warps}"] = (
            functools.partial(intra.intra_scores, chunk=chunk, sub=sub, num_warps=warps), (q, k, b))
      stages["score_grads"] = functools.partial(grads.score_grads, scale=scale, chunk=chunk), (do, v)
      dq, dk, db = key_grads(q, k, v, do, b, states, d_states)
      d_scores = grads.score_grads(do, v, scale=scale, chunk=chunk)
      for warps in (4, 8):
        stages[f"intra_grads warps{warps}"] = (
            functools.partial(intra.intra_grads, chunk=chunk, sub=sub, num_warps=warps),
            (q, k, b, d_scores, dq, dk, db))
    rows += _time_stages(op_name, batch, seq, stages, reps)
  return rows


def _time_stages(op_name: str, batch: int, seq: int, stages: dict, reps: int) -> list[dict]:
  """One row per stage {name: (fn, args)}: the median ms of jit(fn)(*args) alone (or the error)."""
  import jax  # noqa: PLC0415

  from benchmarks.timing import time_ms  # noqa: PLC0415

  rows = []
  for name, (fn, args) in stages.items():
    timed = _timed(lambda fn=fn, args=args: time_ms(jax.jit(fn), *args, max_batches=reps))
    rows.append({"op": op_name, "kernel": name, "batch": batch, "seq": seq,
                 "ms": timed.get("ms", float("nan")), "error": timed.get("error")})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _delta_breakdown_rows(batch: int, seq: int, reps: int) -> list[dict]:
  """Median ms of each Pallas kernel of the gated delta rule, forward and backward, on its own (bf16, C 64);
  the two scans also split into `state.runs_for(N)` runs (`pallas.delta.SPLIT_SCANS`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from linmoe.kernels.pallas import delta, delta_chunk, delta_output, delta_scan, state  # noqa: PLC0415

  chunk, scale = 64, DIM**-0.5
  keys = jax.random.split(jax.random.key(seq), 6)
  q, k, v, do = (jax.random.normal(key, (batch, seq, HEADS, DIM), jnp.bfloat16) for key in keys[:4])
  k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, seq, HEADS, 1), jnp.bfloat16))
  g = jax.nn.log_sigmoid(jax.random.normal(keys[5], (batch, seq // chunk, chunk, HEADS, 1)))
  b = jnp.cumsum(g, axis=2).reshape(batch, seq, HEADS, 1)
  h0 = jnp.zeros((batch, HEADS, DIM, DIM), jnp.float32)
  block_v, runs = delta._block_v(batch * HEADS, DIM), state.runs_for(seq // chunk)
  wy = functools.partial(delta_chunk.wy_factors, doc=None, chunk=chunk)
  forward = functools.partial(delta_scan.forward_scan, doc=None, chunk=chunk, block_v=block_v)
  backward = functools.partial(delta_scan.backward_scan, doc=None, chunk=chunk, scale=scale, block_v=block_v)
  w, u, m = jax.jit(wy)(k, v, beta, b)
  states, values, _ = jax.jit(forward)(w, u, k, b, h0)
  d_states, d_values, _ = jax.jit(backward)(q, k, w, b, do, h0)
  stages = {
      "wy_factors": (wy, (k, v, beta, b)),
      "forward_scan": (forward, (w, u, k, b, h0)),
      f"forward_scan runs{runs}": (functools.partial(forward, runs=runs), (w, u, k, b, h0)),
      "chunk_outputs": (functools.partial(delta_output.chunk_outputs, doc=None, scale=scale, chunk=chunk,
                                          block_v=block_v), (q, k, values, b, states)),
      "backward_scan": (backward, (q, k, w, b, do, h0)),
      f"backward_scan runs{runs}": (functools.partial(backward, runs=runs), (q, k, w, b, do, h0)),
      "query_key_grads": (functools.partial(delta_output.query_key_grads, doc=None, scale=scale, chunk=chunk,
                                            block_k=min(delta.BLOCK_K, DIM)), (q, k, values, do, b, states, d_states)),
      "wy_grads": (functools.partial(delta_chunk.wy_grads, doc=None, chunk=chunk),
                   (k, v, beta, b, m, d_values, states)),
  }
  return _time_stages("delta_rule", batch, seq, stages, reps)


def _table(rows: Sequence[dict]) -> str:
  """One line per (batch, seq, op, impl): fwd and fwd+bwd ms."""
  fmt = lambda x: "-" if x is None else f"{x:9.3f}"  # noqa: E731
  lines = [f"{'batch':>5} {'seq':>6} {'op':<16} {'impl':<13} {'chunk':>5} {'fwd ms':>9} {'fwd+bwd':>9}  note"]
  for r in sorted(rows, key=lambda r: (r["seq"] * r["batch"], r["seq"], r["op"], r["impl"], r["chunk"] or 0)):
    lines.append(f"{r['batch']:>5} {r['seq']:>6} {r['op']:<16} {r['impl']:<13} {r['chunk'] or '-':>5} "
                 f"{fmt(r['fwd_ms']):>9} {fmt(r['fwd_bwd_ms']):>9}  {r['error'] or ''}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="JSON file for the results")
  parser.add_argument("--shapes", type=_parse_shapes, default=list(SHAPES), help="e.g. 8x2048,1x65536")
  parser.add_argument("--reps", type=int, default=9,
                      help="timed batches of queued calls per JAX case (benchmarks/timing.py; median)")
  parser.add_argument("--warmup-ms", type=int, default=100, help="do_bench warmup of the fla cases")
  parser.add_argument("--rep-ms", type=int, default=500, help="do_bench repetition time of the fla cases")
  parser.add_argument("--fla-timeout", type=float, default=180.0, help="seconds for the fla subprocess")
  parser.add_argument("--impls", type=lambda t: t.split(","), default=list(ALL_IMPLS),
                      help=f"comma-separated subset of {','.join(ALL_IMPLS)}")
  parser.add_argument("--families", type=lambda t: t.split(","), default=list(FAMILIES),
                      help=f"comma-separated subset of {','.join(FAMILIES)}")
  parser.add_argument("--breakdown", type=_parse_shapes, default=[],
                      help="shapes (e.g. 1x16384) at which to time every Pallas kernel on its own")
  parser.add_argument("--chunk-sizes", type=lambda t: [int(c) for c in t.split(",")], default=[64],
                      help="chunk sizes of our impls, e.g. 64,128 (fla and attention: their own)")
  parser.add_argument("--delta-split", action="store_true",
                      help="time the delta rule's Pallas rows with its scans split into runs as well")
  parser.add_argument("--fla-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.fla_worker:
    fla_worker(args.shapes, args.families, args.warmup_ms, args.rep_ms)
    return
  rows = (_run_fla(args.shapes, args.families, args.warmup_ms, args.rep_ms, args.fla_timeout)
          if "fla" in args.impls else [])
  import jax  # noqa: PLC0415

  meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "heads": HEADS, "dim": DIM,
          "dtype": "bfloat16"}
  stages = []

  def save() -> None:  # after every case, so that a run cut short keeps what it measured
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "pallas_kernels": stages}, f, indent=1)

  def on_row(row: dict) -> None:
    rows.append(row)
    save()

  _jax_rows(args.shapes, args.families, args.impls, args.reps, args.chunk_sizes, args.delta_split, on_row)
  for b, t in args.breakdown:
    if {"simple_gla", "gla"} & set(args.families):
      stages += _breakdown_rows(b, t, args.reps)
    if {"delta_rule", "gated_delta_rule"} & set(args.families):
      stages += _delta_breakdown_rows(b, t, args.reps)
  save()
  print(meta)
  print(_table(rows))
  for row in stages:
    print(f"{row['batch']:>3}x{row['seq']:<6} {row['op']:<10} {row['kernel']:<28} {row['ms']:8.3f} ms")


if __name__ == "__main__":
  main()
