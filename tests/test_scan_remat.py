"""The scanned layer stack equals the unrolled one, and every remat policy gives the same gradients."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.config import ModelConfig, default_config
from linmoe.decode import decode_step, prefill
from linmoe.model import LinearMoELM

VOCAB, SEQ, PROMPT = 64, 21, 13  # SEQ not a multiple of the chunk (8)


def model_config(**overrides) -> ModelConfig:
  """5 layers of pattern LN: two scanned repeats and one unrolled block; a 4-expert MoE."""
  m = default_config().model
  m.update(lsm="retnet", pattern="LN", n_layers=5, d_model=16, n_heads=2, chunk_size=8)
  m.moe.update(num_experts=4, top_k=2, d_ff=16)
  m.update(overrides)
  return ModelConfig.from_config(m, VOCAB)


def to_scanned(params: dict, cfg: ModelConfig) -> dict:
  """Unrolled parameters (block_0 ... block_{n-1}) -> the scanned layout (layers/block_j stacked over
  repeats, then the remaining blocks unrolled)."""
  unit = len(cfg.pattern)
  repeats = cfg.n_layers // unit
  scanned = {k: v for k, v in params.items() if not k.startswith("block_")}
  scanned["layers"] = {f"block_{j}": jax.tree.map(lambda *a: jnp.stack(a), *(
      params[f"block_{r * unit + j}"] for r in range(repeats))) for j in range(unit)}
  scanned.update({f"block_{i}": params[f"block_{i}"] for i in range(repeats * unit, cfg.n_layers)})
  return scanned


@pytest.fixture(scope="module")
def unrolled():
  cfg = model_config()
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)
  params = nn.meta.unbox(jax.jit(LinearMoELM(cfg).init)(jax.random.key(0), tokens)["params"])
  return cfg, params, tokens, loss_and_grads(cfg, params, tokens)


def loss_and_grads(cfg: ModelConfig, params, tokens):
  """The mean squared logits plus the MoE balance loss (so the aux path is differentiated too);
  returns ((loss, (aux, logits)), grads)."""
  def loss(p):
    logits, aux = LinearMoELM(cfg).apply({"params": p}, tokens)
    return jnp.mean(logits**2) + aux["moe_lb_loss"], (aux, logits)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def assert_grads_close(actual, expected) -> None:
  """fp32 rounding only: a scanned or rematerialized program fuses and sums in another order, so each
  gradient agrees within rtol 1e-4 plus 1e-5 of its largest entry."""
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    atol = 1e-5 * float(jnp.max(jnp.abs(e)))
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_scanned_stack_matches_unrolled(unrolled):
  cfg, params, tokens, ((loss, (aux, _)), grads) = unrolled
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  boxed = jax.eval_shape(LinearMoELM(scan_cfg).init, jax.random.key(0), tokens)["params"]
  assert boxed["layers"]["block_0"]["mixer"]["q_proj"]["kernel"].names[0] == "layers"
  scan_params = to_scanned(params, cfg)
  assert jax.tree.structure(scan_params) == jax.tree.structure(nn.meta.unbox(boxed))
  (scan_loss, (scan_aux, logits)), scan_grads = loss_and_grads(scan_cfg, scan_params, tokens)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  for key in aux:
    np.testing.assert_allclose(scan_aux[key], aux[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert_grads_close(scan_grads, to_scanned(grads, cfg))

  # Decoding reads and writes the scanned cache: prefill + one token at a time = the parallel logits.
  model = LinearMoELM(scan_cfg)
  prompt_logits, cache = jax.jit(prefill, static_argnums=(0, 3))(model, scan_params, tokens[:, :PROMPT], SEQ)
  np.testing.assert_allclose(prompt_logits, logits[:, PROMPT - 1], atol=2e-4, rtol=0)
  step = jax.jit(decode_step, static_argnums=0)
  for t in range(PROMPT, SEQ):
    step_logits, cache = step(model, scan_params, cache, tokens[:, t])
    np.testing.assert_allclose(step_logits, logits[:, t], atol=2e-4, rtol=0, err_msg=f"token {t}")


@pytest.mark.parametrize("remat", ["block", "save_matmuls"])
def test_remat_policies_give_the_same_gradients(unrolled, remat):
  cfg, params, tokens, ((loss, _), grads) = unrolled
  (remat_loss, _), remat_grads = loss_and_grads(dataclasses.replace(cfg, remat=remat), params, tokens)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert_grads_close(remat_grads, grads)


@pytest.mark.parametrize("lsm", ["lightning", "hgrn2", "rwkv7"])
def test_depth_dependent_layers_scan(lsm):
  """The LSMs that compute with their depth (decay slopes, gate bounds, depth-dependent inits) get it as a
  traced scalar in the scanned stack: its depth-dependent inits and its logits equal the unrolled stack's.
  (rwkv7 inherits rwkv6's depth-dependent inits and adds its own, so rwkv6 is covered through it.)"""
  cfg = model_config(lsm=lsm, pattern="L", n_layers=3, chunk_size=16)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)
  init = lambda c, seed: nn.meta.unbox(jax.jit(LinearMoELM(c).init)(jax.random.key(seed), tokens)["params"])
  params, other_seed = init(cfg, 0), init(cfg, 1)
  deterministic = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, other_seed)
  expected, scanned = to_scanned(params, cfg), init(scan_cfg, 0)
  checked = 0
  for (path, is_fixed), e, a in zip(jax.tree_util.tree_leaves_with_path(to_scanned(deterministic, cfg)),
                                    jax.tree.leaves(expected), jax.tree.leaves(scanned)):
    if np.all(is_fixed) and "layers" in jax.tree_util.keystr(path):
      np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
      checked += 1
  assert checked > 0 or lsm != "rwkv7"  # (lightning's and hgrn2's depth enters the forward only)
  logits = jax.jit(LinearMoELM(cfg).apply)({"params": params}, tokens)[0]
  scan_logits = jax.jit(LinearMoELM(scan_cfg).apply)({"params": expected}, tokens)[0]
  np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-5)
