"""End to end: training lowers the loss, logs, checkpoints, resumes exactly, stops on NaN, evaluates."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import checkpoint
from linmoe.config import ConfigError
from linmoe.eval import evaluate_checkpoint
from linmoe.trainer import NonFiniteLossError, Trainer
from tests.conftest import tiny_config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def full_run(small_corpus, tmp_path_factory):
  """8 steps in one go (logs every 2, evaluates and checkpoints every 4)."""
  config = tiny_config(small_corpus, str(tmp_path_factory.mktemp("full")))
  Trainer(config).train()
  return config


def test_training_logs_metrics_evals_and_checkpoints(full_run):
  records = read_metrics(full_run.workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "moe_lb_loss", "moe_z_loss"):
    assert all(np.isfinite(r[key]) for r in train), key
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  assert evals[-1]["eval_ppl"] == pytest.approx(np.exp(evals[-1]["eval_loss"]), rel=1e-5)
  assert train[-1]["loss"] < train[0]["loss"]
  assert sorted(os.listdir(os.path.join(full_run.workdir, "checkpoints"))) == ["4", "8"]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(full_run.workdir, "tensorboard")))


def test_resume_is_exact(full_run, small_corpus, tmp_path):
  config = tiny_config(small_corpus, str(tmp_path))
  Trainer(config).train(until=5)  # an interrupted run: stops (and checkpoints) at step 5
  Trainer(config).train()  # a new process on the same workdir resumes from step 5
  resumed, full = train_losses(tmp_path), train_losses(full_run.workdir)
  for step in (2, 4, 6, 8):
    assert resumed[step] == full[step], step


def test_standalone_eval_matches_training_eval(full_run):
  result = evaluate_checkpoint(full_run.workdir)
  last_eval = [r for r in read_metrics(full_run.workdir) if "eval_loss" in r][-1]
  assert result["step"] == 8
  assert result["eval_loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(full_run, small_corpus, tmp_path):
  config = tiny_config(small_corpus, str(tmp_path))
  config.train.steps = 12
  trainer = Trainer(config)
  trainer.train(until=4)
  manager = checkpoint.checkpoint_manager(config.workdir, 3)
  good = trainer.restore_or_init(manager)
  # Poison the checkpoint's optimizer moments so the step after 4 produces NaN updates, then loss.
  poisoned = good.replace(params=jax.tree.map(lambda p: p * jnp.nan, good.params))
  checkpoint.save(manager, 5, poisoned.replace(step=jnp.int32(5)))
  manager.wait_until_finished()
  with pytest.raises(NonFiniteLossError, match="at step 6"):
    Trainer(config).train()
  assert sorted(os.listdir(os.path.join(config.workdir, "checkpoints"))) == ["4", "5"]


def test_workdir_of_another_model_is_refused(full_run, small_corpus):
  config = tiny_config(small_corpus, full_run.workdir, d_model=64)
  with pytest.raises(ConfigError, match="d_model"):
    Trainer(config).train()


def run_cli(*args):
  return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True,
                        timeout=300)


def test_cli_reports_bad_config_in_one_line():
  result = run_cli("--config", "configs/tiny.py", "--config.model.lsm=nope")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("config error: model.lsm = 'nope'")


def test_cli_reports_missing_data_path(tmp_path):
  result = run_cli("--config", "configs/tiny.py", f"--config.data.path={tmp_path}/missing.jsonl",
                   f"--config.workdir={tmp_path}")
  assert result.returncode == 2
  assert "missing.jsonl" in result.stderr.strip().splitlines()[-1]
