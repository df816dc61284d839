"""Reads raw text documents from jsonl, zstd-compressed jsonl and txt files."""

import dataclasses
import glob
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence

import zstandard

from linmoe.data.errors import DataError

_log = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".json")
_ZSTD_SUFFIXES = (".jsonl.zst", ".zst")
_TEXT_SUFFIXES = (".txt",)
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class ReadStats:
  """Counts from one `read_documents` call.

  Attributes:
    files: Number of files read.
    documents: Number of documents returned.
    skipped_lines: Number of malformed jsonl lines skipped.
  """
  files: int
  documents: int
  skipped_lines: int


def _expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Expands paths, globs and comma-separated lists into a list of files.

  Args:
    paths: One path or glob, a comma-separated string of those, or a sequence
      of paths or globs.

  Returns:
    The matching file paths, globs sorted, in the given order, each file once.

  Raises:
    DataError: If no path is given or a path or glob matches nothing.
  """
  entries = paths.split(",") if isinstance(paths, str) else list(paths)
  entries = [os.path.expanduser(e.strip()) for e in entries if e.strip()]
  if not entries:
    raise DataError(f"no data paths given: {paths!r}")
  files = []
  for entry in entries:
    if any(c in entry for c in _GLOB_CHARS):
      matches = sorted(p for p in glob.glob(entry, recursive=True)
                       if os.path.isfile(p))
    else:
      matches = [entry] if os.path.isfile(entry) else []
    if not matches:
      raise DataError(f"{entry}: no such data file")
    files.extend(matches)
  return list(dict.fromkeys(files))


def _parse_line(line: bytes) -> str | None:
  """Returns the non-blank "text" field of a JSON line, or None if unusable."""
  try:
    record = json.loads(line)
  except ValueError:  # Bad JSON or bad UTF-8.
    return None
  text = record.get("text") if isinstance(record, dict) else None
  if not isinstance(text, str) or not text.strip():
    return None
  return text


def _parse_jsonl(lines: Iterable[bytes]) -> tuple[list[str], int]:
  """Parses JSON lines into (texts, number of malformed lines).

  Blank lines are ignored and not counted as malformed.
  """
  texts, skipped = [], 0
  for line in lines:
    if not line.strip():
      continue
    text = _parse_line(line)
    if text is None:
      skipped += 1
    else:
      texts.append(text)
  return texts, skipped


def _read_file(path: str) -> tuple[list[str], int]:
  """Reads one file into (texts, number of malformed lines), by suffix."""
  if path.endswith(_ZSTD_SUFFIXES):
    with open(path, "rb") as f:
      reader = zstandard.ZstdDecompressor().stream_reader(
          f, read_across_frames=True)
      try:
        return _parse_jsonl(io.BufferedReader(reader))
      except zstandard.ZstdError as e:
        raise DataError(f"{path}: corrupt zstd data ({e})") from e
  if path.endswith(_JSONL_SUFFIXES):
    with open(path, "rb") as f:
      return _parse_jsonl(f)
  if path.endswith(_TEXT_SUFFIXES):
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from e
    return ([text] if text.strip() else []), 0
  supported = ", ".join(_ZSTD_SUFFIXES + _JSONL_SUFFIXES + _TEXT_SUFFIXES)
  raise DataError(f"{path}: unsupported suffix (expected one of {supported})")


def read_documents(paths: str | Sequence[str]) -> tuple[list[str], ReadStats]:
  """Reads all documents from the given files.

  `.jsonl`/`.json` files hold one JSON object per line with a string "text"
  field; `.jsonl.zst`/`.zst` files are the same, zstd compressed; a `.txt`
  file is one document. Malformed lines (bad JSON, missing, non-string or
  blank "text") are skipped, counted and logged as a warning.

  Args:
    paths: One path or glob, a comma-separated string of those, or a sequence
      of paths or globs.

  Returns:
    The documents in file order, and the read statistics.

  Raises:
    DataError: If a path matches nothing, a suffix is unsupported, or a file
      yields no usable text.
  """
  files = _expand_paths(paths)
  docs, skipped = [], 0
  for path in files:
    texts, bad = _read_file(path)
    if bad:
      _log.warning("%s: skipped %d malformed lines", path, bad)
    if not texts:
      raise DataError(f"{path}: no usable text ({bad} malformed lines)")
    docs.extend(texts)
    skipped += bad
  return docs, ReadStats(files=len(files), documents=len(docs),
                         skipped_lines=skipped)
