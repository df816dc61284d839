"""Held-out perplexity of a checkpoint: `python -m linmoe.eval --workdir W [--step S]`."""
from absl import app, flags, logging

from linmoe import checkpoint
from linmoe.trainer import Trainer


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program (see linmoe.generate.define_flags)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def evaluate_checkpoint(workdir: str, step: int | None = None) -> dict:
  """Loads <workdir>/config.json and a checkpoint; returns eval_loss and eval_ppl on the held-out split."""
  config = checkpoint.read_config(workdir)
  trainer = Trainer(config)
  manager = checkpoint.checkpoint_manager(workdir, config.train.keep_checkpoints)
  if manager.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  state = trainer.restore_or_init(manager, step)
  return {"step": int(state.step), **trainer.evaluate(state.params)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(evaluate_checkpoint(flags.FLAGS.workdir, flags.FLAGS.step))


if __name__ == "__main__":
  define_flags()
  app.run(main)
