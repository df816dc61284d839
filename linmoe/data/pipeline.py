"""Builds the train and eval datasets from a data config."""

import dataclasses
import logging
from typing import Any

from linmoe.data.dataset import PackedDataset
from linmoe.data.errors import DataError
from linmoe.data.grain_loader import GrainDataset
from linmoe.data.packing import pack_documents
from linmoe.data.readers import ReadStats
from linmoe.data.sources import load_documents
from linmoe.data.tokenizers import Tokenizer, build_tokenizer

_log = logging.getLogger(__name__)

LOADERS = ("index", "grain")


@dataclasses.dataclass(frozen=True)
class Data:
  """Everything training needs from the data pipeline.

  Attributes:
    train: Training data; `train.stream(batch_size, state)` serves its batches
      (PackedDataset for data.loader = "index", GrainDataset for "grain").
    eval: Held-out windows, served in order.
    tokenizer: The tokenizer the streams were encoded with.
    stats: Counts from reading the source.
  """
  train: PackedDataset | GrainDataset
  eval: PackedDataset
  tokenizer: Tokenizer
  stats: ReadStats

  def describe(self) -> str:
    """One line: documents, files and tokens."""
    train_tokens = ("tokenized as read" if self.train.num_tokens is None
                    else f"{self.train.num_tokens:,}")
    return (f"data: {self.stats.documents} documents from {self.stats.files} files "
            f"({self.stats.skipped_lines} malformed lines skipped); {train_tokens} train / "
            f"{self.eval.num_tokens:,} eval tokens")


def build_data(data_config: Any, seq_len: int, seed: int) -> Data:
  """Reads, splits, tokenizes and packs the corpus.

  Documents are split into train and eval before tokenizing, so no document
  straddles the two. The eval documents are tokenized at once; the training
  documents at once by the "index" loader, as they are served by "grain".

  Args:
    data_config: Has `source` ("files" or "tfds:<name>[:<config>]"), `path`,
      `tfds_dir`, `text_feature`, `eval_split` (see sources.load_documents),
      `tokenizer` ("byte", "qwen2" or a tokenizer.json path), `eval_fraction`
      and `loader` (one of LOADERS).
    seq_len: Tokens per example, T.
    seed: Seed of the document split and of the training order.

  Returns:
    The datasets, tokenizer and read statistics.

  Raises:
    DataError: If any step cannot be carried out.
  """
  if data_config.loader not in LOADERS:
    raise DataError(f"data.loader = {data_config.loader!r}: must be one of {', '.join(LOADERS)}")
  docs = load_documents(data_config, seed)
  tokenizer = build_tokenizer(data_config.tokenizer)
  pack = lambda d: pack_documents(tokenizer.encode_batch(list(d)), tokenizer.eod_id)
  eval_tokens = pack(docs.eval)
  if data_config.loader == "grain":
    train = GrainDataset(docs.train, tokenizer, seq_len, seed)
  else:
    train = PackedDataset(pack(docs.train), seq_len, seed, tokenizer.eod_id)
  _log.info("data: %d train / %d eval documents, %d eval tokens",
            len(docs.train), len(docs.eval), len(eval_tokens))
  return Data(train=train, eval=PackedDataset(eval_tokens, seq_len, seed, tokenizer.eod_id),
              tokenizer=tokenizer, stats=docs.stats)
