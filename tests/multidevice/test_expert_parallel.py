"""Expert parallelism on 8 CPU devices: the MoE layer's outputs, aux losses and gradients (input and every
weight) equal one device's, dropless and in capacity mode with dropped slots."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from linmoe.config import MESH_AXES, ModelConfig, default_config
from linmoe.layers.moe import MoE
from linmoe.model import init_params
from linmoe.parallel.expert import expert_parallel_moe
from linmoe.parallel.mesh import BATCH_AXES, make_mesh

BATCH, SEQ, D_MODEL = 4, 10, 16
MESHES = {"expert8": dict(expert=8), "expert4_data2": dict(expert=4, data=2)}


def moe_config(dispatch: str) -> ModelConfig:
  m = default_config().model
  m.d_model, m.n_heads = D_MODEL, 2
  # Factor 0.5 drops about half the slots; the experts of later token shards lose the most.
  m.moe.update(num_experts=8, top_k=2, d_ff=8, dispatch=dispatch, capacity_factor_train=0.5)
  return ModelConfig.from_config(m, 64)


def layer_and_grads(cfg: ModelConfig, params, x, cotangent):
  """Outputs, aux losses and the gradients of <out, cotangent> + aux losses by params and x."""
  layer = MoE(cfg)

  def loss(p, x):
    y, aux = layer.apply({"params": p}, x)
    return jnp.sum(y * cotangent) + aux["moe_lb_loss"] + aux["moe_z_loss"], (y, aux)

  (_, (y, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, aux, grads


@pytest.fixture(scope="module", params=["dropless", "capacity"])
def single_device(request):
  """The layer's config, inputs and one device's results for two seeds."""
  cfg = moe_config(request.param)
  fn = jax.jit(lambda *a: layer_and_grads(cfg, *a))
  cases = []
  for seed in (0, 1):
    kx, kc, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (BATCH, SEQ, D_MODEL))
    cotangent = jax.random.normal(kc, x.shape)
    params = init_params(MoE(cfg), kp, x)
    cases.append(((params, x, cotangent), fn(params, x, cotangent)))
  return cfg, cases


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_expert_parallel_equals_one_device(single_device, mesh_name):
  cfg, cases = single_device
  sizes = {axis: MESHES[mesh_name].get(axis, 1) for axis in MESH_AXES}
  mesh = make_mesh(sizes)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda *a: layer_and_grads(cfg, *a))
    for (params, x, cotangent), expected in cases:
      x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
      actual = fn(params, x, cotangent)
      jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5), actual, expected)
  if cfg.moe.dispatch == "capacity":
    assert 0.2 < float(expected[1]["moe_dropped_frac"]) < 0.8


def test_experts_not_divisible_by_the_expert_axis_is_a_clear_error():
  tokens, routed = jnp.zeros((8, D_MODEL)), jnp.zeros((8, 2), jnp.int32)
  params = (jnp.zeros((4, D_MODEL, 8)),)
  with jax.set_mesh(make_mesh({axis: 8 if axis == "expert" else 1 for axis in MESH_AXES})):
    with pytest.raises(ValueError, match="must be divisible by mesh.expert"):
      expert_parallel_moe(tokens, routed, routed.astype(jnp.float32), params, lambda *a: a[0])
