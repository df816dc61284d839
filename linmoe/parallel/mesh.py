"""The device mesh and the shardings the trainer uses (with rules.py, the only modules that know
mesh axis names).

Parallel code reads the mesh of the surrounding `jax.set_mesh(mesh)` context (the trainer sets it
around init and every step) through `axis_size`, so layers never hold a mesh object.
"""
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from linmoe.config import MESH_AXES

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes MESH_AXES over `devices` (default: all), sized by the config (validated: product
  = device count)."""
  shape = tuple(mesh_config[axis] for axis in MESH_AXES)
  return Mesh(np.asarray(jax.devices() if devices is None else devices).reshape(shape), MESH_AXES)


def axis_size(name: str) -> int:
  """Size of mesh axis `name` in the current `jax.set_mesh` context (1 without a mesh)."""
  return int(dict(jax.sharding.get_abstract_mesh().shape).get(name, 1))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays split over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global host arrays -> sharded jax arrays; each process places only its addressable shards (the
  rows its devices hold), so the same call works with one process or many."""
  return {k: jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
          for k, a in batch.items()}


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs with shardings."""
  def shard_bytes(a):
    return int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return sum(shard_bytes(a) for a in jax.tree.leaves(abstract_tree))
