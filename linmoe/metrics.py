"""Metric output: a line on stdout, one JSON object per line in <workdir>/metrics.jsonl, TensorBoard."""
import json
import math
import os
import sys

import tensorboardX
import tqdm


def _plain(value):
  """A float (or a list of floats for arrays, e.g. per-expert load); non-finite values as strings."""
  if getattr(value, "ndim", 0):
    return [_plain(v) for v in value.tolist()]
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Writes scalar metrics for a step everywhere at once; a progress bar on interactive terminals."""

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = (tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
                 if sys.stdout.isatty() else None)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def write(self, step: int, metrics: dict) -> None:
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, float):
        self._tb.add_scalar(key, value, step)
      elif isinstance(value, list):
        for i, item in enumerate(value):
          self._tb.add_scalar(f"{key}/{i}", item, step)
    line = f"step {step}: " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        if k != "step" and not isinstance(v, list))
    (self._bar.write if self._bar is not None else print)(line)
    sys.stdout.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
    if self._bar is not None:
      self._bar.close()
