"""Multi-query associative recall (MQAR, the Zoology task): recall accuracy against state size.

A sequence starts with `pairs` key-value pairs (keys from the lower half of the vocabulary, values
from the upper half), then the keys are asked again in random order at random later positions, each
followed by its value (Zoology's layout); the model must predict the value at the key. Only those
positions are scored. Each model
(2 blocks of one mixer, a dense SwiGLU MLP, no MoE) is trained from scratch on freshly drawn
sequences and scored on held-out ones; its state size is the bytes of its decode cache after a
prompt of the sequence length (LSM memories are fixed, attention KV caches grow with the length).

  python3 -m benchmarks.mqar --out results.json [--models gla,attention] [--widths 64,128]
      [--tasks 128:8,256:16] [--steps 2000] [--lr 3e-3] [--vocab 8192] [--small]
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks.train_throughput import write_json
from linmoe.config import ModelConfig, default_config
from linmoe.decode import cache_bytes, prefill
from linmoe.model import LinearMoELM, init_params
from linmoe.steps import cross_entropy

MODELS = ("bla", "retnet", "gla", "deltanet", "gated_deltanet", "mamba2", "hgrn2", "mom", "mom-noshared",
          "attention")
VOCAB = 8192  # Zoology's; a smaller one (`--vocab`) is learned in fewer steps


def mqar_batch(key: jax.Array, batch: int, seq: int, pairs: int, vocab: int = VOCAB):
  """inputs [batch, seq], query slots and their answers [batch, A] int32, drawn on the device: the logits
  at slot s (a repeated key) must predict its value, which follows it in the input (Zoology's layout: the
  query region holds key-value pairs too, at even offsets after the context). Keys are distinct within a
  row; each row asks A = min(pairs, (seq - 2 * pairs) // 2) of them, in random order."""
  half = vocab // 2
  positions = (seq - 2 * pairs) // 2  # places for a query pair after the context
  asked_count = min(pairs, positions)
  if half - 1 < pairs or asked_count < 1:
    raise ValueError(f"MQAR needs vocab/2 - 1 >= pairs and seq >= 2 * pairs + 2; got vocab={vocab}, "
                     f"seq={seq}, pairs={pairs}")

  def row(key):
    k_keys, k_values, k_slots, k_asked = jax.random.split(key, 4)
    keys = 1 + jax.random.choice(k_keys, half - 1, (pairs,), replace=False)
    values = jax.random.randint(k_values, (pairs,), half, vocab)
    slots = 2 * pairs + 2 * jnp.sort(jax.random.choice(k_slots, positions, (asked_count,), replace=False))
    asked = jax.random.permutation(k_asked, pairs)[:asked_count]
    context = jnp.stack([keys, values], axis=1).reshape(-1)
    inputs = (jnp.zeros((seq,), jnp.int32).at[: 2 * pairs].set(context).at[slots].set(keys[asked])
              .at[slots + 1].set(values[asked]))
    return inputs, slots.astype(jnp.int32), values[asked]

  return jax.vmap(row)(jax.random.split(key, batch))


def model_config(name: str, width: int, chunk: int, vocab: int = VOCAB) -> ModelConfig:
  m = default_config().model
  m.update(d_model=width, n_layers=2, n_heads=max(1, width // 64), chunk_size=chunk)
  m.moe.update(num_experts=0, d_ff=2 * width)
  if name == "attention":
    m.pattern = "N"
  elif name.startswith("mom"):
    m.lsm = "mom"
    m.mom.update(inner="gla", num_memories=4, top_k=2, shared_memory=name == "mom")
  else:
    m.lsm = name
  return ModelConfig.from_config(m, vocab)


def query_loss(params, model, inputs, slots, answers):
  """Mean loss and accuracy of the answers at the query slots; only those positions reach the output
  head (the [batch, seq, vocab] logits would dominate the step)."""
  logits, _ = model.apply({"params": params}, inputs, logits_at=slots)  # [batch, A, vocab]
  return jnp.mean(cross_entropy(logits, answers)), jnp.mean(jnp.argmax(logits, -1) == answers)


def train_and_score(cfg: ModelConfig, seq: int, pairs: int, steps: int, batch: int, lr: float,
                    seed: int = 0, steps_per_call: int = 250) -> dict:
  """Trains on fresh MQAR batches over cfg's vocabulary (drawn on the device, `steps_per_call` steps per
  jitted scan), then scores held-out ones."""
  model = LinearMoELM(cfg)
  params = init_params(model, jax.random.key(seed), jnp.zeros((1, seq), jnp.int32))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps), weight_decay=0.1))

  def step(carry, key):
    params, opt_state = carry
    queries = mqar_batch(key, batch, seq, pairs, cfg.vocab_size)
    (loss, _), grads = jax.value_and_grad(query_loss, has_aux=True)(params, model, *queries)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @functools.partial(jax.jit, static_argnums=2)
  def train_steps(carry, key, count):
    return jax.lax.scan(step, carry, jax.random.split(key, count))

  carry, key, losses = (params, tx.init(params)), jax.random.key(1 + seed), []
  start = time.perf_counter()
  for done in range(0, steps, steps_per_call):
    key, sub = jax.random.split(key)
    carry, chunk_losses = train_steps(carry, sub, min(steps_per_call, steps - done))
    losses.append(float(chunk_losses[-1]))
  train_s = time.perf_counter() - start
  held_out = mqar_batch(jax.random.key(10_000 + seed), 4 * batch, seq, pairs, cfg.vocab_size)
  _, accuracy = jax.jit(lambda p, *queries: query_loss(p, model, *queries))(carry[0], *held_out)
  _, cache = jax.jit(prefill, static_argnums=(0, 3))(model, carry[0], held_out[0][:1], seq)
  return {"accuracy": float(accuracy), "final_loss": losses[-1], "loss_curve": losses,
          "state_bytes": cache_bytes(cache), "train_s": train_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--widths", default="64,128")
  parser.add_argument("--tasks", default="64:4,128:8,256:16", help="seq:pairs,...")
  parser.add_argument("--steps", type=int, default=None, help="default 1500 (300 with --small)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--vocab", type=int, default=VOCAB, help="keys: the lower half, values: the upper")
  parser.add_argument("--small", action="store_true", help="a CPU run: one short task, few steps")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.small:
    args.widths, args.tasks, args.batch = "64", "64:4", 32
  args.steps = args.steps or (300 if args.small else 1500)
  rows = []
  payload = {"device": jax.devices()[0].device_kind, "steps": args.steps, "lr": args.lr, "vocab": args.vocab,
             "rows": rows}
  print(f"device: {jax.devices()[0].device_kind}")
  print(f"{'model':>14} {'width':>5} {'seq':>5} {'pairs':>5} {'accuracy':>8} {'state KiB':>9} {'s':>6}")
  for name in args.models.split(","):
    for width in map(int, args.widths.split(",")):
      for task in args.tasks.split(","):
        seq, pairs = map(int, task.split(":"))
        row = {"model": name, "width": width, "seq": seq, "pairs": pairs}
        cfg = model_config(name, width, min(64, seq), args.vocab)
        row.update(train_and_score(cfg, seq, pairs, args.steps, args.batch, args.lr))
        rows.append(row)
        write_json(args.out, payload)  # after every case: a run cut short keeps what it measured
        print(f"{name:>14} {width:>5} {seq:>5} {pairs:>5} {row['accuracy']:>8.3f} "
              f"{row['state_bytes'] / 1024:>9.1f} {row['train_s']:>6.0f}", flush=True)


if __name__ == "__main__":
  main()
