"""The mesh context that parallel code reads."""
import jax
import numpy as np
from jax.sharding import Mesh

from linmoe.parallel.mesh import axis_size


def test_axis_size_reads_the_current_mesh():
  assert jax.device_count() == 8
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "sequence"))
  assert axis_size("sequence") == 1
  with jax.set_mesh(mesh):
    assert (axis_size("data"), axis_size("sequence"), axis_size("tensor")) == (2, 4, 1)
