"""Builds the train and eval datasets from a data config."""

import dataclasses
import logging
from typing import Any

from linmoe.data.dataset import PackedDataset
from linmoe.data.packing import pack_documents, split_documents
from linmoe.data.readers import ReadStats, read_documents
from linmoe.data.tokenizers import Tokenizer, build_tokenizer

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Data:
  """Everything training needs from the data pipeline.

  Attributes:
    train: Training windows, served shuffled per epoch.
    eval: Held-out windows, served in order.
    tokenizer: The tokenizer the streams were encoded with.
    stats: Counts from reading the files.
  """
  train: PackedDataset
  eval: PackedDataset
  tokenizer: Tokenizer
  stats: ReadStats


def build_data(data_config: Any, seq_len: int, seed: int) -> Data:
  """Reads, splits, tokenizes and packs the corpus.

  Documents are split into train and eval before tokenizing, so no document
  straddles the two.

  Args:
    data_config: Has `path` (files, globs or a comma-separated list, see
      read_documents), `tokenizer` ("byte" or a tokenizer.json path) and
      `eval_fraction` (fraction of documents held out, in (0, 1)).
    seq_len: Tokens per example, T.
    seed: Seed of the document split and of the training window order.

  Returns:
    The datasets, tokenizer and read statistics.

  Raises:
    DataError: If any step cannot be carried out.
  """
  docs, stats = read_documents(data_config.path)
  train_docs, eval_docs = split_documents(docs, data_config.eval_fraction, seed)
  tokenizer = build_tokenizer(data_config.tokenizer)
  train_tokens = pack_documents(tokenizer.encode_batch(train_docs),
                                tokenizer.eod_id)
  eval_tokens = pack_documents(tokenizer.encode_batch(eval_docs),
                               tokenizer.eod_id)
  _log.info("data: %d files, %d train / %d eval documents, %d train / %d eval "
            "tokens, %d skipped lines", stats.files, len(train_docs),
            len(eval_docs), len(train_tokens), len(eval_tokens),
            stats.skipped_lines)
  return Data(train=PackedDataset(train_tokens, seq_len, seed),
              eval=PackedDataset(eval_tokens, seq_len, seed),
              tokenizer=tokenizer, stats=stats)
