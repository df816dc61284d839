"""Every parameter of every model carries logical axis names; the rules map them to mesh axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from linmoe.config import ModelConfig, default_config
from linmoe.layers import LSM_LAYERS
from linmoe.model import LinearMoELM
from linmoe.parallel.rules import fit_spec, mesh_spec


@pytest.mark.parametrize("lsm", sorted(LSM_LAYERS))
def test_every_parameter_has_one_logical_name_per_dimension(lsm):
  m = default_config().model
  m.update(lsm=lsm, pattern="LN", n_layers=2, d_model=32, n_heads=2, chunk_size=16)
  m.moe.update(num_experts=4, d_ff=32, num_shared_experts=1, shared_expert_gate=True)
  model = LinearMoELM(ModelConfig.from_config(m, 128))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
    assert is_box(leaf), f"{jax.tree_util.keystr(path)} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)


def test_rules_map_parameters_for_fsdp_tensor_and_experts():
  sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 2, "sequence": 2}
  assert mesh_spec(("embed", "heads", "head_dim"), (32, 4, 8), sizes) == PartitionSpec("fsdp", "tensor", None)
  assert mesh_spec(("experts", "mlp", "embed"), (4, 16, 32), sizes) == PartitionSpec(
      "expert", "tensor", "fsdp")
  assert mesh_spec(("batch", "seq", "act_embed"), (8, 16, 32), sizes) == PartitionSpec(
      ("data", "fsdp"), "sequence", None)


def test_axes_that_do_not_divide_a_dimension_are_dropped():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  assert fit_spec(PartitionSpec(("data", "fsdp"), "tensor"), (2, 5), sizes) == PartitionSpec("data", None)
  assert fit_spec(PartitionSpec(("data", "fsdp"), "tensor"), (1, 6), sizes) == PartitionSpec(None, "tensor")
  assert fit_spec(PartitionSpec("fsdp"), (8, 3), sizes) == PartitionSpec("fsdp", None)
