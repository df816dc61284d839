"""Train a Linear-MoE language model: `python train.py --config configs/tiny.py --config.a.b=value`.

Kept short on purpose: the loop lives in linmoe/trainer.py so tests and notebooks can import it.
Several processes (hosts) run the same command with --num_processes, --process_id and
--coordinator_address (or the environment variables JAX_NUM_PROCESSES, JAX_PROCESS_ID,
JAX_COORDINATOR_ADDRESS).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from linmoe.config import ConfigError
from linmoe.data import DataError
from linmoe.parallel import distributed
from linmoe.trainer import NonFiniteLossError, Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (ml-collections).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                                   "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                                      "Processes in the run (1: a single process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", 0)),
                                   "This process's index, 0-based.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the trainer prints its own progress
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    Trainer(_CONFIG.value).train()
  except (ConfigError, DataError, NonFiniteLossError) as e:
    print(e, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
