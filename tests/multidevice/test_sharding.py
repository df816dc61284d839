"""Every mesh gives the numbers of one device: the loss and every gradient of a tiny hybrid MoE model
(one LSM block, one attention block), and the losses `Trainer` logs.

Tolerance (fp32): the sharded program sums in another order (partial sums per shard, then a reduction),
so values agree to rounding: loss within rtol 1e-5; each gradient within rtol 1e-4 plus an atol of
1e-4 times its largest entry (entries near zero carry the absolute rounding of the large ones).

To add a mesh (e.g. when sequence or expert parallelism lands) add one line to CASES.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from linmoe.config import MESH_AXES, ModelConfig, default_config
from linmoe.model import LinearMoELM, init_params
from linmoe.parallel import rules
from linmoe.parallel.mesh import batch_sharding, make_mesh, put_global, replicated
from linmoe.steps import loss_fn
from linmoe.trainer import Trainer
from tests.conftest import tiny_config

VOCAB, BATCH, SEQ = 128, 8, 24  # SEQ: not a multiple of the chunk (16); divisible by 2, 4, 8
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL_FRACTION = 1e-5, 1e-4, 1e-4

# (mesh, instance): one instance of each recurrence family (and MoM) on a data/fsdp/tensor mesh, then the
# sequence and expert meshes. A new mesh is one more line.
CASES = [
    ("data=8", "retnet"),  # simple_gla
    ("fsdp=8", "gla"),  # gla
    ("data=2,fsdp=2,tensor=2", "gated_deltanet"),  # delta_rule
    ("fsdp=4,tensor=2", "rwkv6"),  # gla_bonus
    ("data=8", "mamba"),  # diagonal_ssm
    ("fsdp=8", "rwkv7"),  # dplr
    ("fsdp=4,tensor=2", "titans"),  # titans
    ("data=2,fsdp=2,tensor=2", "mom"),  # Mixture-of-Memories over gla
    ("sequence=8", "gated_deltanet"),  # LASP-2 with a matrix carry, LASP-2H, short convs across shards
    ("data=2,sequence=4", "gla"),
    ("fsdp=2,tensor=2,sequence=2", "mom"),
    ("expert=4,data=2", "retnet"),  # expert parallelism
]


def model_config(lsm: str) -> ModelConfig:
  """d_model 32, 2 heads, pattern LN (two blocks: compiles stay short), a 4-expert top-2 MoE of width 32."""
  m = default_config().model
  m.update(lsm=lsm, pattern="LN", n_layers=2, d_model=32, n_heads=2, chunk_size=16)
  m.moe.update(num_experts=4, top_k=2, d_ff=32)
  m.mom.update(num_memories=2, top_k=1)
  return ModelConfig.from_config(m, VOCAB)


def mesh_shape(name: str) -> dict[str, int]:
  """Mesh name -> axis sizes: "data=2,tensor=4" -> {"data": 2, "tensor": 4}."""
  return {axis: int(size) for axis, size in (part.split("=") for part in name.split(","))}


def mesh_config(shape: dict[str, int]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({axis: shape.get(axis, 1) for axis in MESH_AXES})


def loss_and_grads(params, batch, model: LinearMoELM, cfg: ModelConfig):
  return jax.value_and_grad(lambda p: loss_fn(p, model, cfg, batch)[0])(params)


@functools.cache
def one_device(lsm: str):
  """(params, batch, loss, grads) computed on one device without a mesh."""
  cfg = model_config(lsm)
  model = LinearMoELM(cfg)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  def init_loss_and_grads(rng):  # one program: a compile per instance, not two
    params = init_params(model, rng, batch["inputs"])
    return params, *loss_and_grads(params, batch, model, cfg)
  params, loss, grads = jax.jit(init_loss_and_grads)(jax.random.key(0))
  return params, jax.device_get(batch), loss, grads


def assert_same_as_one_device(mesh_shape: dict[str, int], lsm: str) -> None:
  """The loss and every gradient on `mesh_shape` equal the one-device ones (tolerance above)."""
  cfg = model_config(lsm)
  model = LinearMoELM(cfg)
  params, batch, loss, grads = one_device(lsm)
  mesh = make_mesh(mesh_config(mesh_shape))
  boxed = jax.eval_shape(model.init, jax.random.key(0), batch["inputs"])["params"]
  param_shardings = rules.shardings(boxed, mesh)
  if {"fsdp", "tensor"} & set(mesh_shape):
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(param_shardings))
  with jax.set_mesh(mesh):
    step = jax.jit(functools.partial(loss_and_grads, model=model, cfg=cfg),
                   in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=(replicated(mesh), param_shardings))
    mesh_loss, mesh_grads = step(jax.device_put(params, param_shardings),
                                 put_global(batch, batch_sharding(mesh)))
  np.testing.assert_allclose(mesh_loss, loss, rtol=LOSS_RTOL)
  for (path, g_mesh), g in zip(jax.tree_util.tree_leaves_with_path(mesh_grads), jax.tree.leaves(grads)):
    atol = GRAD_ATOL_FRACTION * max(float(jnp.max(jnp.abs(g))), 1e-3)
    np.testing.assert_allclose(g_mesh, g, rtol=GRAD_RTOL, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_name,lsm", CASES, ids=[f"{m}-{l}" for m, l in CASES])
def test_loss_and_gradients_match_one_device(mesh_name, lsm):
  assert jax.device_count() == 8
  assert_same_as_one_device(mesh_shape(mesh_name), lsm)


def logged_losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_trainer_on_a_mesh_logs_the_losses_of_one_device(small_corpus, tmp_path):
  """Both runs in this 8-device process: the one-device run is a Trainer on a mesh of device 0 alone.

  The mesh run stops at step 2 (a sharded checkpoint) and resumes from it, so restoring into the
  shardings is covered too.
  """
  def config(workdir, mesh):
    c = tiny_config(small_corpus, str(tmp_path / workdir), pattern="LN", n_heads=2)
    c.train.update(steps=4, batch_size=8, log_every=1, eval_every=4, ckpt_every=2)
    c.mesh.update(mesh)
    return c
  Trainer(config("one", {}), devices=jax.devices()[:1]).train()
  trainer = Trainer(config("mesh", mesh_shape("fsdp=2,expert=2,sequence=2")))
  assert not trainer.state_shardings.params["embed"]["embedding"].is_fully_replicated
  trainer.train(until=2)
  trainer.train()  # restores step 2 from the sharded checkpoint
  one, mesh = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "mesh")
  assert sorted(mesh) == [1, 2, 3, 4]
  np.testing.assert_allclose([mesh[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5)
