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
  n = len(docs)
  if n < 2:
    raise DataError(f"need at least 2 documents to split, got {n}")
  if not 0 < eval_fraction < 1:
    raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  num_eval = min(n - 1, max(1, round(eval_fraction * n)))
  order = np.random.default_rng(seed).permutation(n)
  is_eval = np.zeros(n, dtype=bool)
  is_eval[order[:num_eval]] = True
  train = [d for d, e in zip(docs, is_eval) if not e]
  held_out = [d for d, e in zip(docs, is_eval) if e]
  return train, held_out


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
