"""Tiny hybrids with the sequence split 8 ways: the loss and every parameter gradient equal one device's.

Two models (two compiles each, to keep CI short): the LN MoE hybrid (`LinearMoELM`) with MoM layers of
two GLA memories and a shared one, and a hybrid with one LSM block of an instance of each other family
and one attention block: mamba2 (simple_gla, short conv), rwkv6 (gla_bonus, token shift), mamba
(diagonal_ssm, conv), gated_deltanet (delta_rule, convs), rwkv7 (dplr), titans. Both end in a LASP-2H
attention block. 32 tokens give 4 per shard with chunks of 16. Tolerance: |err| <= 1e-4 * (1 + max |ref|),
fp32 (ten times the op tests': the embedding gradient sums many terms through several blocks).
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linmoe.config import ModelConfig, default_config
from linmoe.layers.common import rms_norm
from linmoe.model import Block, LinearMoELM, init_params
from tests.multidevice.test_sequence_parallel import assert_close

VOCAB, BATCH, SEQ = 64, 2, 32
TOL = 1e-4
FAMILY_INSTANCES = ("mamba2", "rwkv6", "mamba", "gated_deltanet", "rwkv7", "titans")


def _config(lsm: str, n_layers: int, pattern: str = "L", num_experts: int = 4) -> ModelConfig:
  m = default_config().model
  m.d_model, m.n_heads, m.chunk_size, m.kernel_impl = 16, 2, 16, "chunked"
  m.lsm, m.n_layers, m.pattern = lsm, n_layers, pattern
  m.moe.num_experts, m.moe.d_ff = num_experts, 16
  m.mom.num_memories = 2
  return ModelConfig.from_config(m, VOCAB)


class EachFamily(nn.Module):
  """tokens [batch, seq] -> logits: embed, one L block per FAMILY_INSTANCES, one N block, norm, head
  (dense MLPs)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(VOCAB, self.cfg.d_model)(tokens)
    for i, lsm in enumerate(FAMILY_INSTANCES):
      x, _ = Block(dataclasses.replace(self.cfg, lsm=lsm), "L", i)(x)
    x, _ = Block(self.cfg, "N", len(FAMILY_INSTANCES))(x)
    return nn.Dense(VOCAB, use_bias=False)(rms_norm(self.cfg, "final_norm")(x))


MODELS = {
    "ln_moe_mom": lambda: LinearMoELM(_config("mom", 2, "LN")),
    "each_family": lambda: EachFamily(_config("gla", len(FAMILY_INSTANCES) + 1, num_experts=1)),
}


def _loss(model: nn.Module, params, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy, mean over [batch, seq - 1]."""
  logits = model.apply({"params": params}, tokens)
  logits = logits[0] if isinstance(logits, tuple) else logits  # LinearMoELM: (logits, aux)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _sequence_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("sequence",))


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_grads_match_one_device(name):
  model = MODELS[name]()
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
  params = init_params(model, jax.random.key(0), tokens)
  loss_and_grads = jax.value_and_grad(functools.partial(_loss, model))
  expected = jax.jit(loss_and_grads)(params, tokens)
  mesh = _sequence_mesh()
  with jax.set_mesh(mesh):
    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "sequence")))
    actual = jax.jit(loss_and_grads, in_shardings=shardings)(params, tokens)
  assert_close(actual[0], expected[0], f"{name}: loss", TOL)
  jax.tree.map_with_path(
      lambda path, a, e: assert_close(a, e, f"{name}: grad {jax.tree_util.keystr(path)}", TOL),
      actual[1], expected[1])


def test_sequence_length_not_divisible_is_refused():
  model = MODELS["ln_moe_mom"]()
  tokens = jnp.zeros((BATCH, SEQ + 4), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :SEQ])["params"]
  with jax.set_mesh(_sequence_mesh()):
    with pytest.raises(ValueError, match="not divisible by the 'sequence' mesh axis"):
      jax.eval_shape(functools.partial(_loss, model), params, tokens)
