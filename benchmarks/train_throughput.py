"""Whole-model training throughput: full optimizer steps at a fixed token budget per step.

For each model and sequence length (batch = tokens_per_step / seq): tokens/s, MFU (model FLOPs as
counted in benchmarks/flops.py over the chip's bf16 dense peak), the compiled step's memory (XLA's
memory analysis: arguments + outputs + temporaries - aliased) and the compile time. The step is the
trainer's own `train_step` (forward, backward, AdamW; bf16 compute, fp32 master weights).

Models: an LSM name (a pure-LSM stack), NAME@PATTERN (e.g. gla@LLLN, a hybrid) or "attention"
(every block softmax attention, cuDNN flash attention on GPU), all with the preset's MoE. Blocks are
rematerialized (`--remat`, default block: 64K tokens of A0.3B-2B activations do not fit otherwise) and
the layer stack is one `nn.scan`.

The JSON file is rewritten after every case, so a run cut short keeps what it measured. The step is
compiled from abstract shapes first and its memory printed before any array is allocated
(`--compile-only` stops there: a memory check without running). `--profile DIR` writes a trace of one
step per case and adds the trace's device time by part of the model (benchmarks/trace_summary.py);
it turns off XLA's CUDA graphs (command buffers) for the whole run, so that the trace shows kernels.

  python3 -m benchmarks.train_throughput --out results.json [--models gla,attention]
      [--seqs 2048,4096] [--tokens 65536] [--layers 12] [--steps 10] [--profile DIR] [--small]
      [--compile-only]
"""
import argparse
import functools
import importlib
import json
import os
import statistics
import time

# JAX preallocates 75% of the GPU unless told otherwise (read when the backend starts): 60 GiB of an
# H100, less than the hybrid's 60.8 GiB step at 64K tokens. A benchmark process owns the whole GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402 - after the allocator setting
import jax.numpy as jnp

from benchmarks.flops import step_flops
from benchmarks.trace_summary import format_summary, summarize_trace
from linmoe.config import ModelConfig
from linmoe.model import LinearMoELM, init_params
from linmoe.optim import learning_rate_schedule, make_optimizer
from linmoe.steps import TrainState, train_step

MODELS = ("bla", "lightning", "retnet", "gla", "deltanet", "gated_deltanet", "mamba2", "hgrn2", "mom",
          "gla@LLLN", "attention")
SEQS = (2048, 4096, 8192, 16384, 32768)
# bf16 dense peak of the chip (datasheet, without sparsity), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def model_config(config, name: str, layers: int | None, vocab: int, small: bool,
                 remat: str = "none") -> ModelConfig:
  """The preset config's model section with the mixer `name` (see the module docstring), `remat`
  per block and the layer stack scanned."""
  m = config.model
  m.remat = remat
  lsm, _, pattern = name.partition("@")
  if lsm == "attention":
    m.pattern = "N"
  else:
    m.lsm, m.pattern = lsm, pattern or "L"
  m.scan_layers = True
  if layers:
    m.n_layers = layers
  if small:  # a CPU smoke run of the script itself
    m.update(d_model=64, n_heads=2, n_layers=2, chunk_size=16, compute_dtype="float32")
    m.moe.update(num_experts=4, top_k=2, d_ff=64)
  return ModelConfig.from_config(m, vocab)


def add_model_arguments(parser: argparse.ArgumentParser, models: tuple[str, ...]) -> None:
  """The arguments every whole-model benchmark takes (the preset, the models, their size, the output)."""
  parser.add_argument("--preset", default="configs.a0p3b_2b")
  parser.add_argument("--models", default=",".join(models))
  parser.add_argument("--layers", type=int, default=None, help="override the preset's n_layers")
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--small", action="store_true", help="tiny model, for a CPU run of the script")
  parser.add_argument("--out", default=None)


def write_json(path: str | None, payload: dict) -> None:
  """Writes the results so far (called after every case: a run cut short keeps them)."""
  if path:
    with open(path, "w") as f:
      json.dump(payload, f, indent=1)


def compiled_bytes(compiled) -> int | None:
  """The compiled step's device memory: arguments + outputs + temporaries - aliased (donated)."""
  memory = compiled.memory_analysis()
  return None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def measure(cfg: ModelConfig, train_config, batch: int, seq: int, steps: int,
            profile_dir: str | None, compile_only: bool = False) -> dict:
  """One case: compile the train step from abstract shapes (its memory before any allocation), then
  time `steps` steps on random tokens [batch, seq] after a warm-up; the row's fields, or only
  compile_s and step_memory_gib with `compile_only`."""
  model = LinearMoELM(cfg)
  tx = make_optimizer(train_config, master_weights=cfg.moe.expert_param_dtype != "float32")
  init = functools.partial(init_params, model)
  new_state = lambda params: TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                        nonfinite_step=jnp.int32(-1))
  sample = jnp.zeros((1, cfg.chunk_size), jnp.int32)
  abstract_state = jax.eval_shape(lambda key: new_state(init(key, sample)), jax.random.key(1))
  abstract_data = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("inputs", "targets")}
  step = jax.jit(functools.partial(train_step, model=model, cfg=cfg, tx=tx,
                                   schedule=learning_rate_schedule(train_config)), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(abstract_state, abstract_data).compile()
  row = {"compile_s": time.perf_counter() - start}
  step_bytes = compiled_bytes(compiled)
  row["step_memory_gib"] = None if step_bytes is None else step_bytes / 2**30
  if compile_only:
    return row
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  state = jax.jit(new_state)(jax.jit(init)(jax.random.key(1), sample))
  state, metrics = compiled(state, data)  # warm-up
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      state, metrics = compiled(state, data)
      jax.block_until_ready(metrics["loss"])
    row["profile"] = summarize_trace(profile_dir, compiled.as_text())
  seconds = statistics.median(times)
  flops = step_flops(state.params, cfg, batch, seq)
  peak = peak_flops()
  return {**row, "step_ms": 1e3 * seconds, "tokens_per_s": batch * seq / seconds,
          "model_tflops_per_step": flops["total"] / 1e12,
          "mixer_share_of_flops": flops["mixer"] / flops["total"],
          "mfu": None if peak is None else flops["total"] / seconds / peak,
          "loss": float(metrics["loss"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_arguments(parser, MODELS)
  parser.add_argument("--seqs", default=",".join(map(str, SEQS)))
  parser.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch * seq)")
  parser.add_argument("--remat", default="block", help="model.remat: none, block or save_matmuls")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--profile", default=None, help="write a trace of one step per case here")
  parser.add_argument("--compile-only", action="store_true", help="compile and report memory only")
  args = parser.parse_args()
  if args.profile:  # CUDA graphs hide their kernels from the trace: the whole run goes without them
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  rows = []
  payload = {"device": jax.devices()[0].device_kind, "tokens_per_step": args.tokens, "rows": rows}
  print(f"device: {jax.devices()[0].device_kind}; {args.tokens} tokens per step")
  print(f"{'model':>16} {'seq':>6} {'tok/s':>10} {'MFU':>6} {'GiB':>7} {'compile s':>9} {'loss':>6}")
  for name in args.models.split(","):
    for seq in map(int, args.seqs.split(",")):
      config = importlib.import_module(args.preset).get_config()  # e.g. configs.a0p3b_2b
      cfg = model_config(config, name, args.layers, args.vocab, args.small, args.remat)
      row = {"model": name, "seq": seq, "batch": max(1, args.tokens // seq)}
      try:
        profile = args.profile and f"{args.profile}/{name}_{seq}"
        row.update(measure(cfg, config.train, row["batch"], seq, args.steps, profile,
                           args.compile_only))
      except Exception as e:  # noqa: BLE001 - out of memory in one case does not stop the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      rows.append(row)
      write_json(args.out, payload)
      if "error" in row:
        print(f"{name:>16} {seq:>6} {row['error']}", flush=True)
      elif args.compile_only:
        print(f"{name:>16} {seq:>6} {'-':>10} {'-':>6} {row['step_memory_gib'] or 0:>7.2f} "
              f"{row['compile_s']:>9.1f}", flush=True)
      else:
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{name:>16} {seq:>6} {row['tokens_per_s']:>10.0f} {mfu:>6} "
              f"{row['step_memory_gib'] or 0:>7.2f} {row['compile_s']:>9.1f} {row['loss']:>6.2f}",
              flush=True)
        if "profile" in row:
          print(format_summary(row["profile"]), flush=True)


if __name__ == "__main__":
  main()
