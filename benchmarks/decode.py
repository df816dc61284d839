"""Decoding speed and decode-state memory as the context grows: pure LSM, LLLN hybrid, attention.

For each model, batch size and context length: the median latency of one jitted decode step, the
tokens/s it gives (batch / latency) and the bytes of the decode state (LSM memories and short-conv
context, attention KV caches). The cache is built by prefilling a short prompt into a cache of
`context` positions: an attention layer's decode step attends over its whole cache buffer (masked
past the current position), so its cost is the cost at that context; an LSM layer's state has the
same size whatever the context. Out-of-memory cases are reported, not fatal.

  python3 -m benchmarks.decode --out results.json [--models gla,gla@LLLN,attention]
      [--contexts 1024,131072] [--batches 1,16] [--steps 50] [--small]
"""
import argparse
import functools
import importlib
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.train_throughput import add_model_arguments, model_config, write_json
from linmoe.decode import cache_bytes, decode_step, prefill
from linmoe.model import LinearMoELM, init_params

MODELS = ("gla", "gla@LLLN", "attention")
CONTEXTS = (1024, 4096, 16384, 65536, 131072)
BATCHES = (1, 16)
PROMPT = 16


def measure(cfg, batch: int, context: int, steps: int) -> dict:
  model = LinearMoELM(cfg)
  prompt = jax.random.randint(jax.random.key(0), (batch, PROMPT), 0, cfg.vocab_size)
  params = jax.jit(functools.partial(init_params, model))(jax.random.key(1), prompt[:1])
  _, cache = jax.jit(prefill, static_argnums=(0, 3))(model, params, prompt, context)
  step = jax.jit(decode_step, static_argnums=0, donate_argnums=2)
  token = prompt[:, -1]
  logits, cache = step(model, params, cache, token)  # compile and warm up
  jax.block_until_ready(logits)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    logits, cache = step(model, params, cache, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - start)
  latency = statistics.median(times)
  return {"latency_ms": 1e3 * latency, "tokens_per_s": batch / latency,
          "state_mib": cache_bytes(cache) / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_arguments(parser, MODELS)
  parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()
  rows = []
  payload = {"device": jax.devices()[0].device_kind, "rows": rows}
  print(f"device: {jax.devices()[0].device_kind}")
  print(f"{'model':>12} {'batch':>5} {'context':>8} {'ms/token':>9} {'tok/s':>9} {'state MiB':>10}")
  for name in args.models.split(","):
    config = importlib.import_module(args.preset).get_config()
    cfg = model_config(config, name, args.layers, args.vocab, args.small)
    for batch in map(int, args.batches.split(",")):
      for context in map(int, args.contexts.split(",")):
        row = {"model": name, "batch": batch, "context": context}
        try:
          row.update(measure(cfg, batch, context, args.steps))
          print(f"{name:>12} {batch:>5} {context:>8} {row['latency_ms']:>9.3f} "
                f"{row['tokens_per_s']:>9.0f} {row['state_mib']:>10.1f}", flush=True)
        except Exception as e:  # noqa: BLE001 - out of memory at one context does not stop the table
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
          print(f"{name:>12} {batch:>5} {context:>8} {row['error']}", flush=True)
        rows.append(row)
        write_json(args.out, payload)  # after every case: a run cut short keeps what it measured


if __name__ == "__main__":
  main()
