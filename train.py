"""Train a Linear-MoE language model: `python train.py --config configs/tiny.py --config.a.b=value`.

Kept short on purpose: the loop lives in linmoe/trainer.py so tests and notebooks can import it.
"""
import sys

from absl import app, logging
from ml_collections import config_flags

from linmoe.config import ConfigError
from linmoe.data import DataError
from linmoe.trainer import NonFiniteLossError, Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (ml-collections).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the trainer prints its own progress
  try:
    Trainer(_CONFIG.value).train()
  except (ConfigError, DataError, NonFiniteLossError) as e:
    print(e, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
