"""A packed token stream served as seeded, resumable batches of windows."""

import functools
from collections.abc import Iterator

import numpy as np

from linmoe.data.errors import DataError
from linmoe.data.packing import segment_ids
from linmoe.data.stream import IndexStream


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
  """Returns the read-only order int64[num_windows] of windows in an epoch."""
  order = np.random.default_rng((seed, epoch)).permutation(num_windows)
  order.flags.writeable = False
  return order


class PackedDataset:
  """Non-overlapping windows of seq_len + 1 tokens cut from a token stream.

  Window w is tokens[w * (seq_len + 1) : (w + 1) * (seq_len + 1)]; its first
  seq_len tokens are the inputs and its last seq_len tokens the targets. The
  tail that does not fill a window is dropped.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, eod_id: int):
    """Cuts the stream into windows.

    Args:
      tokens: The token stream, int[N].
      seq_len: Tokens per example, T.
      seed: Seed of the per-epoch window order of `batch`, >= 0.
      eod_id: The end-of-document id that closes each document of the stream.

    Raises:
      DataError: If the arguments are invalid or N < seq_len + 1.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise DataError(f"tokens must be a 1-D integer array, got "
                      f"{tokens.dtype}{list(tokens.shape)}")
    if seq_len < 1:
      raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if seed < 0:
      raise DataError(f"seed must be >= 0, got {seed}")
    self.seq_len = seq_len
    self.seed = seed
    self.eod_id = eod_id
    self.num_tokens = len(tokens)
    self.num_windows = self.num_tokens // (seq_len + 1)
    if self.num_windows == 0:
      raise DataError(self._too_short(1))
    used = self.num_windows * (seq_len + 1)
    self._windows = tokens[:used].astype(np.int32).reshape(self.num_windows,
                                                           seq_len + 1)

  def _too_short(self, batch_size: int) -> str:
    return (f"{self.num_tokens} tokens make {self.num_windows} windows of "
            f"seq_len + 1 = {self.seq_len + 1}, fewer than batch size "
            f"{batch_size}")

  def _check_batch_size(self, batch_size: int) -> None:
    if batch_size < 1:
      raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > self.num_windows:
      raise DataError(self._too_short(batch_size))

  def _examples(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
    windows = self._windows[window_ids]
    inputs = np.ascontiguousarray(windows[:, :-1])
    return {"inputs": inputs, "targets": np.ascontiguousarray(windows[:, 1:]),
            "segment_ids": segment_ids(inputs, self.eod_id)}

  def window_ids(self, step: int, batch_size: int) -> np.ndarray:
    """Returns the windows int64[B] of training batch `step`.

    Position p of the endless sequence of epochs is window
    epoch_permutation(seed, p // num_windows)[p % num_windows]; batch `step`
    holds positions step * B ... step * B + B - 1.
    """
    if step < 0:
      raise DataError(f"step must be >= 0, got {step}")
    self._check_batch_size(batch_size)
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_windows)
    ids = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      order = epoch_permutation(self.seed, int(epoch), self.num_windows)
      ids[sel] = order[offsets[sel]]
    return ids

  def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """Returns training batch `step`, a pure function of (seed, step).

    Args:
      step: The training step, >= 0.
      batch_size: Examples per batch, B <= num_windows.

    Returns:
      {"inputs": int32[B, T], "targets": int32[B, T], "segment_ids":
      int32[B, T]}, targets being inputs shifted left by one token and
      segment_ids numbering the documents of each row (see segment_ids).

    Raises:
      DataError: If step < 0 or the stream has fewer than B windows.
    """
    return self._examples(self.window_ids(step, batch_size))

  def eval_batches(self, batch_size: int,
                   max_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Returns the windows in stream order as full batches, unshuffled.

    Args:
      batch_size: Examples per batch, B <= num_windows.
      max_batches: Most batches to yield; None yields all full batches.

    Returns:
      An iterator of batches shaped as those of `batch`.

    Raises:
      DataError: At once, if the stream has fewer than B windows.
    """
    self._check_batch_size(batch_size)
    num_batches = self.num_windows // batch_size
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
    return (self._examples(np.arange(b * batch_size, (b + 1) * batch_size))
            for b in range(num_batches))

  def stream(self, batch_size: int, state: dict | None = None) -> IndexStream:
    """Training batches from step 0, or from a saved `IndexStream` state."""
    self._check_batch_size(batch_size)
    stream = IndexStream(self.batch, batch_size, step=0)
    if state is not None:
      stream.set_state(state)
    return stream
