"""Language-model quality: pure LSM vs LLLN hybrid vs softmax attention, same width, depth and tokens.

Models are named NAME (pure LSM), NAME@PATTERN (hybrid) or "attention". Each model trains through the
trainer on the bundled corpus (the King James Bible, byte tokenizer) for the same steps and batch, then
is scored on held-out text of that corpus and on a corpus it never saw: the Python language reference
that ships with every Python (`pydoc_data.topics`, 79 topics, 0.46 M characters of technical English).
Parameter counts are printed: the mixers differ in their projections, so "equal" means equal width,
depth, MoE and tokens; the counts say how close.

  python3 -m benchmarks.lm_quality --out results.json [--models gla,gla@LLLN,attention]
      [--steps 2000] [--small]
"""
import argparse
import math
import os
import tempfile

import jax

from benchmarks.train_throughput import write_json
from configs import tiny
from linmoe.data.dataset import PackedDataset
from linmoe.data.packing import pack_documents
from linmoe.trainer import Trainer, param_count

MODELS = ("gla", "gated_deltanet", "gla@LLLN", "gated_deltanet@LLLN", "attention")


def reference_documents() -> list[str]:
  from pydoc_data.topics import topics  # noqa: PLC0415 - the out-of-domain corpus
  return [topics[name] for name in sorted(topics)]


def config_for(name: str, steps: int, small: bool, workdir: str):
  c = tiny.get_config()
  c.workdir = workdir
  lsm, _, pattern = name.partition("@")
  c.model.update(pattern="N") if lsm == "attention" else c.model.update(lsm=lsm, pattern=pattern or "L")
  if not small:
    c.model.update(d_model=512, n_layers=8, n_heads=4, compute_dtype="bfloat16")
    c.model.moe.update(num_experts=8, top_k=2, d_ff=512)
    c.train.update(batch_size=32, seq_len=1024, lr=2e-3, warmup_steps=100)
  c.train.update(steps=steps, eval_every=steps, ckpt_every=steps, log_every=max(1, steps // 10))
  return c


def held_out_loss(trainer: Trainer, params, documents: list[str], batches: int) -> float:
  """Mean token loss of `params` over packed windows of `documents` (the trainer's tokenizer)."""
  tokenizer = trainer.data.tokenizer
  tokens = pack_documents(tokenizer.encode_batch(documents), tokenizer.eod_id)
  dataset = PackedDataset(tokens, trainer.config.train.seq_len, seed=0, eod_id=tokenizer.eod_id)
  batch_size = min(trainer.config.train.batch_size, dataset.num_windows)
  loss_sum = count = 0.0
  for batch in dataset.eval_batches(batch_size, batches):
    out = trainer._eval_step(params, batch)  # noqa: SLF001 - the trainer's own jitted eval step
    loss_sum, count = loss_sum + float(out["loss_sum"]), count + float(out["tokens"])
  return loss_sum / count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--steps", type=int, default=None, help="default 2000 (100 with --small)")
  parser.add_argument("--small", action="store_true", help="the tiny config on CPU, few steps")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  steps = args.steps or (100 if args.small else 2000)
  reference = reference_documents()
  rows = []
  payload = {"device": jax.devices()[0].device_kind, "rows": rows}
  print(f"device: {jax.devices()[0].device_kind}; {steps} steps each")
  with tempfile.TemporaryDirectory() as root:
    for name in args.models.split(","):
      trainer = Trainer(config_for(name, steps, args.small, os.path.join(root, name.replace("@", "_"))))
      state = trainer.train()
      in_domain = trainer.evaluate(state.params)["eval_loss"]
      other = held_out_loss(trainer, state.params, reference, trainer.config.train.eval_batches)
      rows.append({"model": name, "params": param_count(state.params), "steps": steps,
                   "tokens": steps * trainer.config.train.batch_size * trainer.config.train.seq_len,
                   "kjv_held_out_loss": in_domain, "python_reference_loss": other,
                   "python_reference_ppl": math.exp(other)})
      write_json(args.out, payload)  # after every model: a run cut short keeps what it measured
  print(f"{'model':>22} {'params':>11} {'KJV held-out':>12} {'Python ref':>10}")
  for row in rows:
    print(f"{row['model']:>22} {row['params']:>11,} {row['kjv_held_out_loss']:>12.3f} "
          f"{row['python_reference_loss']:>10.3f}")


if __name__ == "__main__":
  main()
