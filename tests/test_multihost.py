"""Two processes on localhost (one CPU device each, mesh fsdp=2: parameters, optimizer state and
checkpoints split across the processes) log the losses of a single-process run of the same config."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

STEPS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir: str, corpus: str, *args: str) -> subprocess.Popen:
  """train.py on one CPU device with the tiny test model (tests/conftest.py's sizes)."""
  overrides = dict(workdir=workdir, **{"data.path": corpus, "data.eval_fraction": 0.05},
                   **{f"model.{k}": v for k, v in dict(d_model=32, n_layers=2, n_heads=2, chunk_size=16,
                                                       **{"moe.d_ff": 32}).items()},
                   **{f"train.{k}": v for k, v in dict(steps=STEPS, batch_size=4, seq_len=32, warmup_steps=2,
                                                       log_every=1, eval_every=STEPS, ckpt_every=2,
                                                       eval_batches=2).items()})
  env = dict(os.environ, JAX_PLATFORMS="cpu",  # opt level 0: faster compile, same fp32 results
             XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
  command = [sys.executable, "train.py", "--config", "configs/tiny.py",
             *(f"--config.{k}={v}" for k, v in overrides.items()), *args]
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(path: str) -> list[float]:
  with open(path) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_two_processes_log_the_losses_of_one(small_corpus, tmp_path):
  port = free_port()
  runs = [launch(str(tmp_path / "one"), small_corpus)] + [
      launch(str(tmp_path / "two"), small_corpus, "--config.mesh.fsdp=2", "--num_processes=2",
             f"--process_id={i}", f"--coordinator_address=localhost:{port}") for i in range(2)]
  outputs = [run.communicate(timeout=600)[0] for run in runs]
  for run, output in zip(runs, outputs):
    assert run.returncode == 0, output[-3000:]
  assert "'fsdp': 2" in outputs[1]
  one = losses(tmp_path / "one" / "metrics.jsonl")
  assert len(one) == STEPS
  for path in (tmp_path / "two" / "metrics.jsonl", tmp_path / "two" / "process_1" / "metrics.jsonl"):
    np.testing.assert_allclose(losses(path), one, rtol=1e-5, err_msg=str(path))
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
