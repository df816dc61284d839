"""The device mesh and the shardings the trainer uses; the only module that knows mesh axis names."""
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from linmoe.config import MESH_AXES

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """A mesh with axes MESH_AXES, sized by the config (validated: product = device count)."""
  shape = tuple(mesh_config[axis] for axis in MESH_AXES)
  return Mesh(np.asarray(jax.devices()).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays split over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
