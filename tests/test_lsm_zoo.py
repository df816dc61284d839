"""Every LSM instance in the registry, in an `LN` hybrid (an LSM block, then attention): runs causally,
matches its naive op, decodes token by token exactly like the parallel forward with a fixed-size state, and
trains. Two blocks rather than LLLN's four halve the compiles; stacks of LSM blocks (scanned or not) are
tested in tests/test_scan_remat.py."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.config import ModelConfig
from linmoe.layers import LSM_LAYERS
from linmoe.decode import cache_bytes, decode_step, prefill
from linmoe.model import LinearMoELM, init_params
from linmoe.trainer import Trainer
from tests.conftest import tiny_config

VOCAB, SEQ, PROMPT = 64, 21, 9  # SEQ is not a multiple of the chunk size (16)
DECODE_ATOL = 1e-4  # fp32 logits, decode vs parallel forward
NAIVE_ATOL = 1e-4  # fp32 logits, model with impl="naive" vs "chunked"
PATTERN = "LN"  # one LSM block, then attention
ATTENTION_BLOCK = f"block_{PATTERN.index('N')}"  # its cache grows with the context


# Every registered instance, plus Mixture-of-Memories over the delta rule (its default inner is gla).
ZOO = [(name, {}) for name in LSM_LAYERS] + [("mom", {"inner": "gated_deltanet"})]
# The 30-step training run (the costliest test) for one instance of each recurrence op, plus MoM; gla
# (the default LSM) trains in tests/test_train.py.
TRAINED = [(name, {}) for name in ("retnet", "rwkv6", "mamba", "gated_deltanet", "rwkv7", "titans")] + [ZOO[-1]]


def zoo_config(lsm: str, mom: dict | None = None, **overrides) -> ModelConfig:
  m = tiny_config("unused", "unused").model
  m.lsm, m.pattern, m.n_layers = lsm, PATTERN, len(PATTERN)
  m.update(overrides)
  m.mom.update(mom or {})
  return ModelConfig.from_config(m, VOCAB)


@pytest.fixture(scope="module", params=ZOO, ids=lambda p: "-".join([p[0], *p[1].values()]))
def zoo(request):
  name, mom = request.param
  cfg = zoo_config(name, mom)
  model = LinearMoELM(cfg)
  tokens = jax.random.randint(jax.random.key(3), (2, SEQ), 0, VOCAB)
  params = init_params(model, jax.random.key(0), tokens)
  forward = jax.jit(model.apply)
  logits, _ = forward({"params": params}, tokens)
  # Causality: changing the tokens after position t leaves the logits up to t unchanged.
  t = 13
  changed, _ = forward({"params": params}, tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % VOCAB))
  np.testing.assert_allclose(changed[:, : t + 1], logits[:, : t + 1], atol=1e-5)
  assert not np.allclose(changed[:, t + 1:], logits[:, t + 1:])
  return name, cfg, model, params, tokens, logits


def test_forward_and_gradients_are_finite(zoo):
  _, _, model, params, tokens, logits = zoo
  assert logits.shape == (2, SEQ, VOCAB) and np.isfinite(np.asarray(logits)).all()
  loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["block_0"]["mixer"]))


def test_model_with_naive_op_matches_chunked(zoo):
  name, cfg, _, params, tokens, logits = zoo
  naive = LinearMoELM(dataclasses.replace(cfg, kernel_impl="naive"))
  naive_logits, _ = jax.jit(naive.apply)({"params": params}, tokens)
  np.testing.assert_allclose(naive_logits, logits, atol=NAIVE_ATOL, rtol=0)
  record_difference(name, "naive_vs_chunked_logits", naive_logits, logits)


def test_decode_matches_parallel_forward_with_fixed_state(zoo):
  name, _, model, params, tokens, logits = zoo
  prompt_logits, cache = jax.jit(prefill, static_argnums=(0, 3))(model, params, tokens[:, :PROMPT], SEQ)
  np.testing.assert_allclose(prompt_logits, logits[:, PROMPT - 1], atol=DECODE_ATOL, rtol=0)
  lsm_bytes = lsm_cache_bytes(cache)
  step = jax.jit(decode_step, static_argnums=0)
  decoded = []
  for t in range(PROMPT, SEQ):
    step_logits, cache = step(model, params, cache, tokens[:, t])
    decoded.append(step_logits)
    assert lsm_cache_bytes(cache) == lsm_bytes  # the LSM state does not grow with the context
  # Logits at position t predict token t + 1: decoding token t gives the parallel logits at t.
  decoded = jnp.stack(decoded, axis=1)
  np.testing.assert_allclose(decoded, logits[:, PROMPT:], atol=DECODE_ATOL, rtol=0)
  record_difference(name, "decode_vs_parallel_logits", decoded, logits[:, PROMPT:])


def lsm_cache_bytes(cache: dict) -> int:
  return sum(cache_bytes(layer) for name, layer in cache.items() if name != ATTENTION_BLOCK)


@pytest.mark.parametrize("name, mom", TRAINED, ids=["-".join([n, *m.values()]) for n, m in TRAINED])
def test_thirty_steps_of_training_lower_the_loss(name, mom, small_corpus, tmp_path):
  config = tiny_config(small_corpus, str(tmp_path), lsm=name, pattern=PATTERN, n_layers=len(PATTERN))
  config.model.mom.update(mom)
  config.train.update(steps=30, log_every=5, eval_every=30, ckpt_every=30, lr=1e-2)
  Trainer(config).train()
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses


def record_difference(name: str, what: str, a, b) -> None:
  """Prints the max abs difference (pytest -s shows it; the closing notes quote these)."""
  print(f"[{name}] {what}: max abs diff {float(jnp.max(jnp.abs(a - b))):.2e}")
