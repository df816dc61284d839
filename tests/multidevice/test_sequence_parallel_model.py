"""A tiny LLLN hybrid (three LSM blocks, one attention block) with the sequence split 8 ways: the loss and
every parameter gradient equal one device's, for one instance of each recurrence family and MoM.

The instances also cover the layers' other paths across shard borders: short convolutions (mamba2, mamba,
gated_deltanet), RWKV's token shift (rwkv6, rwkv7) and LASP-2H attention (the N block). 32 tokens give 4
per shard with chunks of 16. Tolerance: |err| <= 1e-5 * (1 + max |ref|), fp32.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linmoe.config import ModelConfig, default_config
from linmoe.model import LinearMoELM
from tests.multidevice.test_sequence_parallel import assert_close

VOCAB, BATCH, SEQ = 64, 2, 32
INSTANCES = {  # model.lsm -> recurrence family
    "mamba2": "simple_gla", "mom": "gla (MoM with two GLA memories and a shared one)", "rwkv6": "gla_bonus",
    "mamba": "diagonal_ssm", "gated_deltanet": "delta_rule", "rwkv7": "dplr", "titans": "titans",
}


def _config(lsm: str) -> ModelConfig:
  m = default_config().model
  m.d_model, m.n_layers, m.n_heads, m.chunk_size, m.pattern = 16, 4, 2, 16, "LLLN"
  m.lsm, m.kernel_impl = lsm, "chunked"
  m.moe.num_experts, m.moe.d_ff = 1, 16  # a dense MLP: MoE is not sequence-specific
  m.mom.inner, m.mom.num_memories = "gla", 2
  return ModelConfig.from_config(m, VOCAB)


def _loss(model: LinearMoELM, params, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy, mean over [batch, seq - 1]."""
  logits, _ = model.apply({"params": params}, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _sequence_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("sequence",))


@pytest.mark.parametrize("lsm", INSTANCES)
def test_loss_and_grads_match_one_device(lsm):
  model = LinearMoELM(_config(lsm))
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
  params = model.init(jax.random.key(0), tokens)["params"]
  loss_and_grads = jax.value_and_grad(functools.partial(_loss, model))
  expected = jax.jit(loss_and_grads)(params, tokens)
  mesh = _sequence_mesh()
  with jax.set_mesh(mesh):
    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "sequence")))
    actual = jax.jit(loss_and_grads, in_shardings=shardings)(params, tokens)
  assert_close(actual[0], expected[0], f"{lsm}: loss")
  jax.tree.map_with_path(lambda path, a, e: assert_close(a, e, f"{lsm}: grad {jax.tree_util.keystr(path)}"),
                         actual[1], expected[1])


def test_sequence_length_not_divisible_is_refused():
  model = LinearMoELM(_config("gated_deltanet"))
  tokens = jnp.zeros((BATCH, SEQ + 4), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :SEQ])["params"]
  with jax.set_mesh(_sequence_mesh()):
    with pytest.raises(ValueError, match="not divisible by the 'sequence' mesh axis"):
      jax.eval_shape(functools.partial(_loss, model), params, tokens)
