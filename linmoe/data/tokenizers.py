"""Tokenizers: raw UTF-8 bytes, or a Hugging Face `tokenizer.json`."""

import os
from collections.abc import Sequence
from typing import Protocol

import tokenizers

from linmoe.data.errors import DataError

DEFAULT_EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
  """Maps text to token ids and back.

  Attributes:
    vocab_size: Number of token ids; every id lies in [0, vocab_size).
    eod_id: The id placed after each document.
  """
  vocab_size: int
  eod_id: int

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text`, without the end-of-document id."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns `[encode(t) for t in texts]`, possibly faster."""

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, dropping the end-of-document id."""


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, with end-of-document id 256."""

  vocab_size = 257
  eod_id = 256

  def encode(self, text: str) -> list[int]:
    """Returns the UTF-8 bytes of `text` as ids."""
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the UTF-8 bytes of each text as ids."""
    return [list(t.encode("utf-8")) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes byte ids, skipping `eod_id`; invalid UTF-8 becomes U+FFFD."""
    data = bytes(int(i) for i in ids if i != self.eod_id)
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer loaded from `tokenizer.json`.

  Encoding adds no special tokens (no BOS/EOS post-processing); documents are
  separated by `eod_id` when packed.
  """

  def __init__(self, path: str, eod_token: str | None = None):
    """Loads the tokenizer.

    Args:
      path: Path to a `tokenizer.json` file.
      eod_token: The end-of-document token; by default the first of
        DEFAULT_EOD_TOKENS in the vocabulary.

    Raises:
      DataError: If the file cannot be loaded or the token is not found.
    """
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises a bare Exception.
      raise DataError(f"{path}: cannot load tokenizer ({e})") from e
    candidates = (eod_token,) if eod_token else DEFAULT_EOD_TOKENS
    ids = [self._tok.token_to_id(t) for t in candidates]
    found = [i for i in ids if i is not None]
    if not found:
      raise DataError(f"{path}: no end-of-document token among {candidates}")
    self.eod_id = found[0]
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text`."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the token ids of each text, encoded in parallel."""
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, dropping `eod_id`."""
    return self._tok.decode([int(i) for i in ids if i != self.eod_id],
                            skip_special_tokens=False)


def build_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
  """Builds a tokenizer from a spec.

  Args:
    spec: "byte", or the path to a Hugging Face `tokenizer.json`.
    eod_token: For a `tokenizer.json`, the end-of-document token (see
      HFTokenizer); must be None for "byte".

  Returns:
    The tokenizer.

  Raises:
    DataError: If the file does not exist or cannot be used.
  """
  if spec == "byte":
    if eod_token is not None:
      raise DataError(f"byte tokenizer has a fixed eod id; got {eod_token!r}")
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise DataError(f"{spec}: no such tokenizer file (or use 'byte')")
  return HFTokenizer(spec, eod_token)
