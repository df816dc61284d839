"""Sequence parallelism: tokens/s and memory per device as one sequence grows, LASP-2 vs one device.

For each model, batch 1, the sequence doubles from `--min-seq` until a step fails (out of memory) or
`--max-seq`: full training steps of the trainer (`Trainer`, bf16 compute, remat per block) on a mesh of
`sequence` = all devices (LASP-2 for LSM blocks, LASP-2H for attention blocks), and on one device for
the scaling ratio. Reported per case: tokens/s per device, the peak memory of device 0 (GPU) and the
bytes each LSM layer all-gathers (its memory states, the same at every length). Data: the bundled corpus
with the byte tokenizer (4M tokens, enough for sequences up to 2M); a model's vocabulary barely matters
to the mixer's cost at these lengths.

  python3 -m benchmarks.sequence_parallel --out sp.json [--models gla,gated_deltanet,gla@LLLN,attention]
      [--min-seq 16384] [--max-seq 2097152] [--steps 3] [--profile DIR] [--small]
"""
import argparse
import importlib
import json
import statistics
import tempfile
import time

import jax

from benchmarks.train_throughput import add_model_arguments
from linmoe.trainer import Trainer

MODELS = ("gla", "gated_deltanet", "gla@LLLN", "attention")


def run_config(preset: str, name: str, seq: int, sequence_shards: int, layers: int | None,
               small: bool, workdir: str):
  c = importlib.import_module(preset).get_config()
  c.workdir = workdir
  c.data.update(path="data/kjv.jsonl.zst", tokenizer="byte")
  lsm, _, pattern = name.partition("@")
  c.model.update(pattern="N") if lsm == "attention" else c.model.update(lsm=lsm, pattern=pattern or "L")
  c.model.update(remat="block")
  if layers:
    c.model.n_layers = layers
  if small:
    c.model.update(d_model=64, n_heads=2, n_layers=2, chunk_size=16, compute_dtype="float32")
    c.model.moe.update(num_experts=4, top_k=2, d_ff=64)
  c.train.update(batch_size=1, seq_len=seq, steps=10**6)
  c.mesh.update(sequence=sequence_shards)
  return c


def gathered_bytes_per_layer(trainer: Trainer) -> int:
  """Bytes one LSM layer all-gathers per step under LASP-2: every shard's fp32 state [heads, dk, dv]
  (with head dim dk = dv = d_model / heads; decays and transitions are extra, at most as large)."""
  cfg, shards = trainer.model_cfg, trainer.mesh.shape["sequence"]
  return shards * cfg.n_heads * cfg.head_dim ** 2 * 4


def measure(trainer: Trainer, steps: int, profile_dir: str | None) -> dict:
  state = trainer.init_state()
  batch = trainer.batch(0)
  start = time.perf_counter()
  state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics["loss"])
  first_s = time.perf_counter() - start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.step(state, trainer.batch(i + 1))
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      state, metrics = trainer.step(state, batch)
      jax.block_until_ready(metrics["loss"])
  seconds, devices = statistics.median(times), trainer.mesh.devices.size
  stats = jax.devices()[0].memory_stats() or {}
  return {"step_s": seconds, "tokens_per_s_per_device": trainer.config.train.seq_len / seconds / devices,
          "compile_and_first_step_s": first_s, "peak_gib_device0": stats.get("peak_bytes_in_use", 0) / 2**30,
          "allgather_bytes_per_lsm_layer": gathered_bytes_per_layer(trainer) if devices > 1 else 0}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_arguments(parser, MODELS)
  parser.add_argument("--min-seq", type=int, default=16384)
  parser.add_argument("--max-seq", type=int, default=2 ** 21)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--profile", default=None, help="write a trace of one step per case here")
  args = parser.parse_args()
  n = jax.device_count()
  rows = []
  print(f"{n} x {jax.devices()[0].device_kind}")
  print(f"{'model':>16} {'devices':>7} {'seq':>9} {'tok/s/device':>12} {'peak GiB':>8} {'gather B/layer':>14}")
  for name in args.models.split(","):
    for shards in sorted({n, 1}, reverse=True):
      seq = args.min_seq
      while seq <= args.max_seq:
        row = {"model": name, "devices": shards, "seq": seq}
        try:
          with tempfile.TemporaryDirectory() as workdir:
            config = run_config(args.preset, name, seq, shards, args.layers, args.small, workdir)
            trainer = Trainer(config, devices=jax.devices()[:shards])
            profile = args.profile and f"{args.profile}/{name.replace('@', '_')}_{shards}_{seq}"
            row.update(measure(trainer, args.steps, profile))
        except Exception as e:  # noqa: BLE001 - out of memory ends this model's doubling, not the run
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        if "error" in row:
          print(f"{name:>16} {shards:>7} {seq:>9} {row['error']}", flush=True)
          break
        print(f"{name:>16} {shards:>7} {seq:>9} {row['tokens_per_s_per_device']:>12.0f} "
              f"{row['peak_gib_device0']:>8.2f} {row['allgather_bytes_per_lsm_layer']:>14}", flush=True)
        seq *= 2
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"devices": n, "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
