"""Training batch streams: an iterator of batches whose position is a small JSON state.

The trainer draws every training batch from a stream and saves `get_state()` with each checkpoint;
on resume it builds the stream from that state, so the run continues at the exact data position.
"""

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class BatchStream(Protocol):
  """An endless iterator of training batches with a checkpointable position. `process_local`: the
  batches hold only this process's rows (else the global batch, of which each process places its own)."""

  process_local: bool

  def __next__(self) -> Batch:
    """Returns the next batch, {"inputs", "targets", "segment_ids"}: int32[B, T] each."""

  def get_state(self) -> dict[str, Any]:
    """Returns the position as a JSON-serializable dict."""

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position returned by get_state."""


class IndexStream:
  """Batch `step`, `step + 1`, ... of a dataset whose batches are a pure function of the step."""

  process_local = False  # global batches

  def __init__(self, batch_fn: Callable[[int, int], Batch], batch_size: int, step: int):
    """`batch_fn(step, batch_size)` returns the batch of a step; `step` is the first one served."""
    self._batch_fn = batch_fn
    self._batch_size = batch_size
    self._step = step

  def __iter__(self) -> "IndexStream":
    return self

  def __next__(self) -> Batch:
    batch = self._batch_fn(self._step, self._batch_size)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._step = int(state["step"])
