"""The Grain loader: documents read with random access, tokenized, packed, batched, checkpointable.

Pipeline (per process): documents[process_index::process_count] -> shuffle (a new order each epoch)
-> repeat -> tokenize + end-of-document id -> concatenate and split into windows of seq_len + 1 tokens
(grain's ConcatThenSplit packing, no padding) -> batches. The iterator's position is Grain's own state,
a small JSON dict, which the trainer saves with every checkpoint and restores on resume: the run goes
on at the exact window, with no batches skipped or replayed.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from linmoe.data.errors import DataError, optional_module
from linmoe.data.packing import segment_ids
from linmoe.data.stream import Batch
from linmoe.data.tokenizers import Tokenizer

if TYPE_CHECKING:
  import grain


class GrainStream:
  """A Grain iterator of training batches (see BatchStream)."""

  process_local = True  # each process reads its own shard of the documents

  def __init__(self, dataset: "grain.IterDataset", eod_id: int):
    self._iterator = iter(dataset)
    self._eod_id = eod_id

  def __iter__(self) -> "GrainStream":
    return self

  def __next__(self) -> Batch:
    windows = next(self._iterator)["tokens"]  # [B, seq_len + 1]
    inputs = np.ascontiguousarray(windows[:, :-1], dtype=np.int32)
    return {"inputs": inputs,
            "targets": np.ascontiguousarray(windows[:, 1:], dtype=np.int32),
            "segment_ids": segment_ids(inputs, self._eod_id)}

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    if "parent_state" not in state:
      raise DataError(f"not a Grain loader state (keys: {', '.join(state)}); was the checkpoint "
                      f"written with another data.loader?")
    self._iterator.set_state(state)


class GrainDataset:
  """Training documents served through Grain (see the module docstring)."""

  def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int):
    """Sets up the pipeline; nothing is read until a stream is drawn.

    Args:
      docs: Random-access training documents.
      tokenizer: Encodes each document; its eod_id closes each document.
      seq_len: Tokens per example, T.
      seed: Seed of the per-epoch document order.
    """
    if len(docs) == 0:
      raise DataError("the Grain loader got no training documents")
    self.docs, self.tokenizer, self.seq_len, self.seed = docs, tokenizer, seq_len, seed
    self.num_tokens = None  # unknown until read: documents are tokenized as they are served

  def _encode(self, text: str) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(text) + [self.tokenizer.eod_id]
    return {"tokens": np.asarray(ids, dtype=np.int32)}

  def pipeline(self, batch_size: int, process_index: int, process_count: int) -> "grain.IterDataset":
    """This process's batches of `batch_size // process_count` windows [B_local, seq_len + 1]."""
    if batch_size % process_count:
      raise DataError(f"batch size {batch_size} is not divisible by {process_count} processes")
    grain = optional_module("grain", "grain", "data.loader = 'grain'")
    docs = grain.MapDataset.source(self.docs)[process_index::process_count]
    tokens = docs.shuffle(seed=self.seed).repeat(None).map(self._encode).to_iter_dataset()
    windows = grain.experimental.ConcatThenSplitIterDataset(
        tokens, length_struct={"tokens": self.seq_len + 1})
    return windows.batch(batch_size // process_count, drop_remainder=True)

  def stream(self, batch_size: int, state: dict | None = None) -> GrainStream:
    """This process's training batches from the start, or from a saved GrainStream state."""
    dataset = self.pipeline(batch_size, jax.process_index(), jax.process_count())
    stream = GrainStream(dataset, self.tokenizer.eod_id)
    if state is not None:
      stream.set_state(state)
    return stream
