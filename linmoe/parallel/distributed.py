"""Multi-process (multi-host) start-up: one JAX program over the devices of several processes.

Every process runs the same `train.py` with the same config; `initialize` joins them through the
coordinator (process 0's host:port) before anything touches a device. Afterwards `jax.devices()` lists
all processes' devices, the mesh spans them, each process feeds the batch rows and restores the
checkpoint shards of its own devices, and process 0 writes the workdir's config and metrics.
"""
import jax

from linmoe.config import ConfigError


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins a run of `num_processes` processes as `process_id` (0-based); nothing for one process."""
  if num_processes <= 1:
    return
  if not coordinator_address:
    raise ConfigError(f"config error: coordinator_address = {coordinator_address!r}: needed (host:port "
                      f"of process 0) when num_processes = {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"config error: process_id = {process_id}: must be in [0, {num_processes})")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
