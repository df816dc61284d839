"""Bad configs stop before any compile with one line naming the key, the value and what is allowed."""
import math

import pytest

from linmoe.config import ConfigError, ModelConfig, default_config, padded_vocab_size, validate


@pytest.mark.parametrize("key,value,expect", [
    ("model.lsm", "transformerx", "model.lsm = 'transformerx': must be one of"),
    ("model.pattern", "LLXN", "model.pattern = 'LLXN'"),
    ("model.pattern", "", "model.pattern = ''"),
    ("model.d_model", 130, "model.d_model = 130: must be divisible by model.n_heads = 4"),
    ("model.n_layers", -2, "model.n_layers = -2: must be a positive integer"),
    ("model.moe.d_ff", 0, "model.moe.d_ff = 0"),
    ("model.moe.num_experts", -1, "model.moe.num_experts = -1"),
    ("model.moe.top_k", 5, "model.moe.top_k = 5: must be in [1, model.moe.num_experts = 4]"),
    ("model.compute_dtype", "float16", "model.compute_dtype = 'float16'"),
    ("model.kernel_impl", "cuda", "model.kernel_impl = 'cuda'"),
    ("train.batch_size", 0, "train.batch_size = 0"),
    ("train.seq_len", -1, "train.seq_len = -1"),
    ("train.lr", 0.0, "train.lr = 0.0"),
    ("train.warmup_steps", -5, "train.warmup_steps = -5"),
    ("data.eval_fraction", 1.5, "data.eval_fraction = 1.5"),
    ("mesh.tensor", 2, "device count 1"),
    ("mesh.data", 0, "mesh.data = 0"),
])
def test_bad_value_names_key_value_and_allowed(key, value, expect):
  config = default_config()
  section, *rest = key.split(".")
  node = config[section]
  for part in rest[:-1]:
    node = node[part]
  node[rest[-1]] = value
  with pytest.raises(ConfigError) as info:
    validate(config, device_count=1)
  message = str(info.value)
  assert expect in message and "\n" not in message


def test_mesh_product_must_equal_device_count():
  config = default_config()
  config.mesh.data = 2
  with pytest.raises(ConfigError, match="device count 1"):
    validate(config, device_count=1)
  validate(config, device_count=2)


def test_batch_must_split_over_data_axes():
  config = default_config()
  config.mesh.data, config.train.batch_size = 4, 6
  with pytest.raises(ConfigError, match="train.batch_size = 6"):
    validate(config, device_count=4)


@pytest.mark.parametrize("overrides,expect", [
    ({"mesh.tensor": 8}, "mesh.tensor = 8: must divide model.n_heads = 4"),
    ({"mesh.tensor": 4, "model.moe.d_ff": 250}, "mesh.tensor = 4: must divide model.moe.d_ff = 250"),
    ({"mesh.tensor": 2, "model.moe.num_shared_experts": 1, "model.moe.shared_d_ff": 3},
     "mesh.tensor = 2: must divide model.moe.shared_d_ff = 3"),
    ({"mesh.expert": 8}, "mesh.expert = 8: must divide model.moe.num_experts = 4"),
    ({"mesh.expert": 2, "model.moe.num_experts": 1}, "mesh.expert = 2: must be 1 for a dense model"),
    ({"mesh.sequence": 8, "train.seq_len": 100}, "mesh.sequence = 8: must divide train.seq_len = 100"),
])
def test_mesh_axis_must_divide_what_it_shards(overrides, expect):
  config = default_config()
  config.update_from_flattened_dict(overrides)
  devices = math.prod(config.mesh.values())
  with pytest.raises(ConfigError) as info:
    validate(config, device_count=devices)
  assert expect in str(info.value) and "\n" not in str(info.value)


def test_every_parallel_axis_is_accepted_when_it_divides():
  config = default_config()
  config.mesh.update(data=2, fsdp=1, expert=2, tensor=2, sequence=2)
  config.train.batch_size = 2
  validate(config, device_count=16)


def test_vocab_follows_tokenizer_padded_to_128_unless_set():
  model = default_config().model
  assert padded_vocab_size(model, 257) == 384
  model.vocab_size = 300
  assert padded_vocab_size(model, 257) == 300
  model.vocab_size = 100
  with pytest.raises(ConfigError, match="model.vocab_size = 100"):
    padded_vocab_size(model, 257)


def test_layer_kinds_repeat_pattern_to_depth():
  model = default_config().model
  model.pattern, model.n_layers = "LLLN", 6
  assert ModelConfig.from_config(model, 384).layer_kinds == "LLLNLL"


@pytest.mark.parametrize("name", ["tiny", "a0p3b_2b", "a1b_7b", "moe_mixtral", "moe_qwen2",
                                  "moe_deepseek_v2"])
def test_bundled_configs_are_valid(name):
  import importlib
  validate(importlib.import_module(f"configs.{name}").get_config(), device_count=1)


@pytest.mark.parametrize("key,value", [("model.moe.router", "topk"),
                                       ("model.moe.dispatch", "dropful"),
                                       ("model.moe.gmm_impl", "cutlass"),
                                       ("model.moe.expert_param_dtype", "float16"),
                                       ("model.moe.capacity_factor_train", 0.0),
                                       ("model.moe.num_shared_experts", -1)])
def test_bad_moe_values_are_named(key, value):
  test_bad_value_names_key_value_and_allowed(key, value, f"{key} = {value!r}")
