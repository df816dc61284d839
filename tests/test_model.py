"""Model-level tests: attention and dense-MLP paths, bf16, and MoE against a loop reference.

Every LSM instance is covered by tests/test_lsm_zoo.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.config import ModelConfig, default_config
from linmoe.layers.moe import MoE
from linmoe.model import LinearMoELM

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
  params = model.init(jax.random.key(0), tokens)["params"]
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


def test_bfloat16_compute_keeps_float32_params():
  cfg = model_config(compute_dtype="bfloat16", pattern="LN")
  model = LinearMoELM(cfg)
  tokens = jnp.zeros((1, SEQ), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits, _ = model.apply({"params": params}, tokens)
  assert np.isfinite(np.asarray(logits)).all()


def moe_reference(params, x, cfg: ModelConfig):
  """Loop over tokens and their top-k experts: the plain definition of the MoE output."""
  tokens = np.asarray(x.reshape(-1, cfg.d_model), np.float64)
  logits = tokens @ np.asarray(params["router"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(tokens)
  silu = lambda a: a / (1 + np.exp(-a))
  for i, (x_i, p_i) in enumerate(zip(tokens, probs)):
    top = np.argsort(-p_i)[: cfg.moe.top_k]
    weights = p_i[top] / p_i[top].sum()
    for e, w in zip(top, weights):
      h = silu(x_i @ params["w_gate"][e]) * (x_i @ params["w_up"][e])
      out[i] += w * (h @ np.asarray(params["w_down"][e], np.float64))
  return out.reshape(x.shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_moe_dispatch_equals_loop_reference(seed):
  cfg = model_config()
  x = jax.random.normal(jax.random.key(seed), (2, 9, cfg.d_model))
  layer = MoE(cfg)
  params = layer.init(jax.random.key(seed + 10), x)["params"]
  y, aux = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, moe_reference(params, x, cfg), rtol=1e-4, atol=1e-5)
  assert np.isfinite(float(aux["moe_lb_loss"])) and float(aux["moe_z_loss"]) > 0


def test_load_balance_loss_is_one_when_balanced():
  from linmoe.layers.moe import router_losses
  logits = jnp.zeros((8, 4))  # uniform router probabilities
  experts = jnp.array([[0, 1], [2, 3]] * 4)  # every expert gets the same share
  losses = router_losses(logits, jax.nn.softmax(logits), experts)
  np.testing.assert_allclose(losses["moe_lb_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(losses["moe_z_loss"], np.log(4.0) ** 2, rtol=1e-6)
