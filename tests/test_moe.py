"""The MoE layer against a loop-over-tokens-and-experts reference, for every router and dispatch mode."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.config import ModelConfig, default_config
from linmoe.layers import moe as moe_layer
from linmoe.layers.moe import MoE, capacity
from linmoe.layers.router import move_rows, route, router_losses
from linmoe.model import init_params

D_MODEL, TOKENS = 16, 18


def moe_config(**overrides) -> ModelConfig:
  m = default_config().model
  m.d_model, m.n_heads = D_MODEL, 2
  m.moe.update(num_experts=4, top_k=2, d_ff=8)
  m.moe.update(overrides)
  return ModelConfig.from_config(m, 64)


def silu(a):
  return a / (1 + np.exp(-a))


def swiglu(x, gate, up, down):
  return (silu(x @ gate) * (x @ up)) @ down


def reference(params, x, cfg: ModelConfig, cap: int | None = None):
  """Loop over tokens in order and their top-k experts; with `cap`, an expert ignores slots past
  its first `cap` (in token order, then slot order)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
  logits = tokens @ p["router"]["kernel"]
  if cfg.moe.router == "softmax":
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  out = np.zeros_like(tokens)
  taken = np.zeros(cfg.moe.num_experts, int)
  for i, (x_i, s_i) in enumerate(zip(tokens, scores)):
    top = np.argsort(-s_i, kind="stable")[: cfg.moe.top_k]
    weights = s_i[top] / s_i[top].sum() if cfg.moe.renormalize else s_i[top]
    for e, w in zip(top, weights):
      taken[e] += 1
      if cap is None or taken[e] <= cap:
        gate, up = np.split(p["w_gate_up"][e], 2, axis=1)
        out[i] += w * swiglu(x_i, gate, up, p["w_down"][e])
    if cfg.moe.num_shared_experts:
      shared = swiglu(x_i, p["shared"]["gate"]["kernel"], p["shared"]["up"]["kernel"],
                      p["shared"]["down"]["kernel"])
      if cfg.moe.shared_expert_gate:
        shared = shared / (1 + np.exp(-(x_i @ p["shared_gate"]["kernel"])))
      out[i] += shared
  return out.reshape(x.shape)


def run(cfg, seed=0, training=True):
  x = jax.random.normal(jax.random.key(seed), (2, TOKENS // 2, D_MODEL))
  layer = MoE(cfg, training=training)
  params = init_params(layer, jax.random.key(seed + 10), x)
  y, aux = layer.apply({"params": params}, x)
  return x, params, y, aux


@pytest.mark.parametrize("overrides", [
    dict(router="softmax", renormalize=True),
    dict(router="softmax", renormalize=False),
    dict(router="sigmoid", renormalize=True),
    dict(num_shared_experts=1, shared_expert_gate=True),
    dict(num_shared_experts=2, shared_d_ff=4),
    dict(dispatch="capacity", capacity_factor_train=8.0),  # nothing dropped: equals dropless
])
@pytest.mark.parametrize("seed", [0, 1])
def test_moe_equals_loop_reference(overrides, seed):
  cfg = moe_config(**overrides)
  x, params, y, aux = run(cfg, seed)
  np.testing.assert_allclose(y, reference(params, x, cfg), rtol=1e-4, atol=1e-5)
  if cfg.moe.dispatch == "capacity":
    assert float(aux["moe_dropped_frac"]) == 0.0


@pytest.mark.parametrize("training,factor_key", [(True, "capacity_factor_train"),
                                                 (False, "capacity_factor_eval")])
def test_capacity_mode_drops_slots_past_capacity_in_token_order(training, factor_key):
  cfg = moe_config(dispatch="capacity", **{factor_key: 0.5})
  x, params, y, aux = run(cfg, training=training)
  cap = capacity(TOKENS * cfg.moe.top_k, cfg.moe.num_experts, 0.5)
  np.testing.assert_allclose(y, reference(params, x, cfg, cap=cap), rtol=1e-4, atol=1e-5)
  slots = TOKENS * cfg.moe.top_k
  kept = float(np.minimum(np.asarray(aux["moe_expert_load"]) * slots, cap).sum())
  np.testing.assert_allclose(aux["moe_dropped_frac"], 1 - kept / slots, rtol=1e-6)
  assert float(aux["moe_dropped_frac"]) > 0


def test_moe_gradients_are_finite_and_reach_every_weight():
  cfg = moe_config(num_shared_experts=1, shared_expert_gate=True)
  x, params, _, _ = run(cfg)
  loss = lambda p: jnp.sum(MoE(cfg).apply({"params": p}, x)[0] ** 2)
  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path


def test_load_balance_loss_is_one_when_balanced():
  logits = jnp.zeros((8, 4))  # uniform router probabilities
  routing = route(logits, "softmax", 2, True)._replace(experts=jnp.array([[0, 1], [2, 3]] * 4))
  losses = router_losses(logits, routing)
  np.testing.assert_allclose(losses["moe_lb_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(losses["moe_z_loss"], np.log(4.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(losses["moe_expert_load"], 0.25)


def test_sigmoid_router_weights_sum_to_one_when_renormalized():
  logits = jax.random.normal(jax.random.key(0), (5, 6))
  routing = route(logits, "sigmoid", 3, True)
  np.testing.assert_allclose(routing.weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(routing.probs.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("repeat", [1, 3])
def test_move_rows_gradient_equals_the_plain_gather(repeat):
  """A partial one-to-one map of repeated rows (some out rows empty, some repeated rows unused)."""
  rng = np.random.default_rng(repeat)
  rows, out_rows = 5, 7
  sources = rng.permutation(rows * repeat)[:4]  # repeated rows that land somewhere
  index = np.zeros(out_rows, np.int32)
  valid = np.zeros(out_rows, bool)
  targets = rng.permutation(out_rows)[:4]
  index[targets], valid[targets] = sources, True
  back = np.zeros(rows * repeat, np.int32)
  back_valid = np.zeros(rows * repeat, bool)
  back[sources], back_valid[sources] = targets, True
  x = jnp.asarray(rng.standard_normal((rows, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((out_rows, 3)), jnp.float32)
  plain = lambda a: jnp.where(valid[:, None], a[index // repeat], 0)
  fast = lambda a: move_rows(a, index, valid, back, back_valid, repeat)
  np.testing.assert_array_equal(fast(x), plain(x))
  np.testing.assert_allclose(jax.vjp(fast, x)[1](cotangent)[0], jax.vjp(plain, x)[1](cotangent)[0],
                             rtol=1e-6)


def test_few_tokens_gather_expert_weights_with_the_grouped_results(monkeypatch):
  """Decoding-sized inputs (slots <= experts) take the per-slot weight gather: same outputs and
  gradients as the sorted grouped path and the loop reference."""
  cfg = moe_config()
  x = jax.random.normal(jax.random.key(5), (1, cfg.moe.num_experts // cfg.moe.top_k, D_MODEL))
  layer = MoE(cfg)
  params = init_params(layer, jax.random.key(6), x)
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x)[0] ** 2)
  gathered = layer.apply({"params": params}, x)[0], jax.grad(loss)(params)
  monkeypatch.setattr(moe_layer, "GATHER_MAX_SLOTS_PER_EXPERT", 0)
  grouped = layer.apply({"params": params}, x)[0], jax.grad(loss)(params)
  np.testing.assert_allclose(gathered[0], reference(params, x, cfg), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(grouped)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_expert_weights_compute_what_their_fp32_copies_compute():
  """expert_param_dtype=bfloat16 stores w_gate_up and w_down in bf16: with bf16 compute, the outputs
  equal those of fp32 parameters holding the same values, and the expert gradients are those
  gradients in bf16 (the fp32 path casts the weights to bf16 and the bf16 gradients back)."""
  cfg32, cfg16 = (dataclasses.replace(moe_config(expert_param_dtype=d), compute_dtype="bfloat16")
                  for d in ("float32", "bfloat16"))
  x = jax.random.normal(jax.random.key(3), (2, TOKENS // 2, D_MODEL))
  shapes = nn.meta.unbox(jax.eval_shape(MoE(cfg16).init, jax.random.key(4), x)["params"])
  assert {shapes[n].dtype for n in ("w_gate_up", "w_down")} == {jnp.dtype(jnp.bfloat16)}
  assert shapes["router"]["kernel"].dtype == jnp.float32
  rng = np.random.default_rng(4)
  params16 = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, s.dtype), shapes)
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params16)
  outs, grads = [], []
  for cfg, params in ((cfg32, params32), (cfg16, params16)):
    apply = lambda p, cfg=cfg: MoE(cfg).apply({"params": p}, x)[0]
    out, grad = jax.jit(lambda p, apply=apply: (apply(p), jax.vjp(apply, p)[1](apply(p))[0]))(params)
    outs.append(out)
    grads.append(grad)
  np.testing.assert_array_equal(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))
  for name in ("w_gate_up", "w_down"):
    assert grads[1][name].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grads[0][name].astype(jnp.bfloat16), np.float32),
                                  np.asarray(grads[1][name], np.float32))
