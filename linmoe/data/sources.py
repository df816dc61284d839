"""Document sources: text files, or a TFDS dataset read through its array-record data source.

`data.source = "files"` reads `data.path` (see readers.py). `data.source = "tfds:<name>[:<config>]"`
opens a prepared TensorFlow Datasets dataset with `tfds.data_source`, which reads array-record files
with random access and needs no TensorFlow. Documents are served lazily, so a large split is never
held in memory by the Grain loader.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from linmoe.data.errors import DataError, optional_module
from linmoe.data.packing import split_documents, split_indices
from linmoe.data.readers import ReadStats, read_documents

TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class Documents:
  """The train and held-out documents of a source.

  Attributes:
    train: Training documents, random access.
    eval: Held-out documents, random access.
    stats: Counts from reading the source.
  """
  train: Sequence[str]
  eval: Sequence[str]
  stats: ReadStats


class TextRecords(Sequence):
  """The text feature of records of a random-access source, as str."""

  def __init__(self, records: Sequence[dict], feature: str,
               ids: np.ndarray | None = None):
    """Wraps `records`.

    Args:
      records: Random-access records, each a dict holding `feature`.
      feature: The text feature, bytes or str.
      ids: The records to serve, in order; None serves all.
    """
    self._records = records
    self._feature = feature
    self._ids = np.arange(len(records)) if ids is None else ids

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index: int) -> str:
    record = self._records[int(self._ids[index])]
    if self._feature not in record:
      raise DataError(f"record has no text feature {self._feature!r} "
                      f"(features: {', '.join(record)}); set data.text_feature")
    text = record[self._feature]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def tfds_name(source: str) -> str:
  """Maps "tfds:<name>[:<config>]" to the TFDS name "<name>[/<config>]"."""
  parts = source[len(TFDS_PREFIX):].split(":")
  if not 1 <= len(parts) <= 2 or not all(parts):
    raise DataError(f"data.source = {source!r}: expected tfds:<name>[:<config>]")
  return "/".join(parts)


def _tfds_documents(data_config: Any, seed: int) -> Documents:
  """Opens the train split (and eval split, or a seeded hold-out of train)."""
  name = tfds_name(data_config.source)
  tfds = optional_module("tensorflow_datasets", "tensorflow-datasets",
                         f"data.source = {data_config.source!r}")
  try:
    splits = tfds.data_source(name, data_dir=data_config.tfds_dir or None,
                              download=False, try_gcs=False)
  except Exception as e:  # tfds raises many types for a missing dataset.
    raise DataError(f"data.source = {data_config.source!r}: cannot open the "
                    f"prepared dataset ({type(e).__name__}: {e})") from e
  wanted = ["train"] + ([data_config.eval_split] if data_config.eval_split else [])
  for split in wanted:
    if split not in splits:
      raise DataError(f"data.source = {data_config.source!r} has no split {split!r} "
                      f"(splits: {', '.join(splits)})")
  train = splits["train"]
  shards = sum(splits[s].dataset_info.splits[s].num_shards for s in wanted)
  feature = data_config.text_feature
  if data_config.eval_split:
    held_out = TextRecords(splits[data_config.eval_split], feature)
    train_docs = TextRecords(train, feature)
  else:
    train_ids, eval_ids = split_indices(len(train), data_config.eval_fraction, seed)
    train_docs = TextRecords(train, feature, train_ids)
    held_out = TextRecords(train, feature, eval_ids)
  stats = ReadStats(files=shards, documents=len(train_docs) + len(held_out),
                    skipped_lines=0)
  return Documents(train_docs, held_out, stats)


def load_documents(data_config: Any, seed: int) -> Documents:
  """Opens `data_config.source` and splits it into train and held-out documents.

  Args:
    data_config: The data config section (source, path, tfds_dir, text_feature,
      eval_split, eval_fraction).
    seed: Seed of the hold-out split.

  Returns:
    The documents.

  Raises:
    DataError: If the source is unknown or cannot be read.
  """
  source = data_config.source
  if source == "files":
    docs, stats = read_documents(data_config.path)
    return Documents(*split_documents(docs, data_config.eval_fraction, seed), stats)
  if source.startswith(TFDS_PREFIX):
    return _tfds_documents(data_config, seed)
  raise DataError(f"data.source = {source!r}: must be 'files' or "
                  f"'{TFDS_PREFIX}<name>[:<config>]'")
