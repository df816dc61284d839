"""Splits documents into train/eval and packs token documents into a stream."""

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from linmoe.data.errors import DataError

T = TypeVar("T")


def split_documents(docs: Sequence[T], eval_fraction: float,
                    seed: int) -> tuple[list[T], list[T]]:
  """Splits documents into disjoint train and eval sets by a seeded shuffle.

  The eval set has `max(1, round(eval_fraction * n))` documents, at most
  n - 1 so that train is never empty. Each set keeps the corpus order.

  Args:
    docs: The n documents.
    eval_fraction: Fraction of documents held out, in (0, 1).
    seed: Seed of the shuffle; the same seed gives the same split.

  Returns:
    (train_docs, eval_docs).

  Raises:
    DataError: If n < 2 or eval_fraction is not in (0, 1).
  """
  train_ids, eval_ids = split_indices(len(docs), eval_fraction, seed)
  return [docs[i] for i in train_ids], [docs[i] for i in eval_ids]


def split_indices(n: int, eval_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The index form of `split_documents`: (train ids, eval ids), each sorted.

  Raises:
    DataError: If n < 2 or eval_fraction is not in (0, 1).
  """
  if n < 2:
    raise DataError(f"need at least 2 documents to split, got {n}")
  if not 0 < eval_fraction < 1:
    raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  num_eval = min(n - 1, max(1, round(eval_fraction * n)))
  order = np.random.default_rng(seed).permutation(n)
  is_eval = np.zeros(n, dtype=bool)
  is_eval[order[:num_eval]] = True
  return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def pack_documents(token_docs: Sequence[Sequence[int]],
                   eod_id: int) -> np.ndarray:
  """Concatenates documents, each followed by `eod_id`.

  Args:
    token_docs: The token ids of each document.
    eod_id: The end-of-document id.

  Returns:
    The token stream, int32[sum(len(d) + 1 for d in token_docs)].
  """
  ends = np.cumsum([len(d) + 1 for d in token_docs], dtype=np.int64)
  tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
  start = 0
  for doc, end in zip(token_docs, ends):
    tokens[start:end - 1] = doc
    start = end
  tokens[ends - 1] = eod_id
  return tokens


def segment_ids(inputs: np.ndarray, eod_id: int) -> np.ndarray:
  """Numbers the documents of packed windows, a new id at each document start.

  A document owns its tokens and the end-of-document token that closes it; the
  next document starts right after that token. Ids start at 1 in every row (0
  is left free for padding) and grow by one at each start.

  Args:
    inputs: Packed token windows, int[B, T].
    eod_id: The end-of-document id.

  Returns:
    int32[B, T] segment ids.
  """
  inputs = np.asarray(inputs)
  starts = np.zeros(inputs.shape, dtype=np.int32)
  starts[:, 1:] = inputs[:, :-1] == eod_id
  return 1 + np.cumsum(starts, axis=1, dtype=np.int32)
