"""Shared fixtures: a small corpus and a tiny config, so the whole suite compiles few shapes."""
import io
import json
import os

# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation passes cost
# more than they save (CPU time -29%, wall -17% on test_lsm_zoo's retnet and mamba2 cases; the multi-device
# tests ran so from the start). Set before JAX's CPU backend starts; subprocesses (the notebook) inherit it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import pytest  # noqa: E402 - after XLA_FLAGS, before anything imports JAX.
import zstandard  # noqa: E402

from linmoe.config import default_config  # noqa: E402

BUNDLED_CORPUS = "data/kjv.jsonl.zst"
# tests/multidevice needs 8 devices from process start: tests/test_multidevice.py runs it apart.
collect_ignore = [] if os.environ.get("LINMOE_MULTIDEVICE") == "1" else ["multidevice"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
  """The first 120 chapters of the bundled corpus as plain jsonl (fast to read and tokenize)."""
  with open(BUNDLED_CORPUS, "rb") as f:
    reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
    lines = [next(reader) for _ in range(120)]
  path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
  path.write_text("".join(lines))
  assert json.loads(lines[0])["text"]
  return str(path)


def tiny_config(corpus: str, workdir: str, **model_overrides):
  """A 2-block model with d_model 32 and a 4-expert MoE; 32-token sequences."""
  c = default_config()
  c.workdir = workdir
  c.data.path = corpus
  c.data.eval_fraction = 0.05
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.chunk_size = 32, 2, 2, 16
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff = 4, 2, 32
  for key, value in model_overrides.items():
    m[key] = value
  t = c.train
  t.steps, t.batch_size, t.seq_len, t.warmup_steps = 8, 4, 32, 2
  t.log_every, t.eval_every, t.ckpt_every, t.eval_batches = 2, 4, 4, 2
  return c
