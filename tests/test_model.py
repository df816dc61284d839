"""Model-level tests: the attention and dense-MLP paths and bf16 compute.

Every LSM instance is covered by tests/test_lsm_zoo.py, the MoE layer by tests/test_moe.py."""
import jax
import jax.numpy as jnp
import numpy as np

from linmoe.config import ModelConfig, default_config
from linmoe.model import LinearMoELM, init_params

VOCAB, SEQ = 64, 24  # SEQ is not a multiple of the chunk size (16)


def model_config(**overrides) -> ModelConfig:
  m = default_config().model
  m.d_model, m.n_layers, m.n_heads, m.chunk_size = 32, 2, 2, 16
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff = 4, 2, 32
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = m
    for part in parents:
      node = node[part]
    node[leaf] = value
  return ModelConfig.from_config(m, VOCAB)


def check_model(cfg: ModelConfig):
  model = LinearMoELM(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)
  params = init_params(model, jax.random.key(0), tokens)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
  logits, aux = forward(params, tokens)
  assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # Causality: changing tokens after position t leaves the logits up to t unchanged.
  t = 13
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % VOCAB)
  logits2, _ = forward(params, changed)
  np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-5)
  assert not np.allclose(logits[:, t + 1:], logits2[:, t + 1:])
  grads = jax.jit(jax.grad(lambda p: jnp.mean(forward(p, tokens)[0] ** 2)))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  return aux


def test_hybrid_with_attention_and_dense_mlp():
  aux = check_model(model_config(lsm="retnet", pattern="LN", **{"moe.num_experts": 1}))
  assert aux == {}


def test_logits_at_selected_positions_equal_the_full_logits_there():
  cfg = model_config(pattern="LN")
  model = LinearMoELM(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, SEQ), 0, VOCAB)
  params = init_params(model, jax.random.key(0), tokens)
  positions = jnp.array([[0, 5, SEQ - 1], [7, 7, 3]], jnp.int32)
  full, _ = model.apply({"params": params}, tokens)
  selected, _ = model.apply({"params": params}, tokens, logits_at=positions)
  np.testing.assert_allclose(selected, jnp.take_along_axis(full, positions[..., None], axis=1), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  cfg = model_config(compute_dtype="bfloat16", pattern="LN")
  model = LinearMoELM(cfg)
  tokens = jnp.zeros((1, SEQ), jnp.int32)
  params = init_params(model, jax.random.key(0), tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits, _ = model.apply({"params": params}, tokens)
  assert np.isfinite(np.asarray(logits)).all()
