"""Tests for linmoe.data: readers, tokenizers, packing, datasets, pipeline."""

import json
import logging
import os
import re
import time

import numpy as np
import pytest
import tokenizers as hf
import zstandard

from linmoe import data
from linmoe.config import default_config, padded_vocab_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(records: list) -> bytes:
  lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
  return ("\n".join(lines) + "\n").encode()


def data_config(**overrides):
  """The default data config section with `overrides`."""
  config = default_config().data
  config.update(overrides)
  return config


def _write(path, content: bytes) -> str:
  path.write_bytes(content)
  return str(path)


# Readers.


def test_read_jsonl(tmp_path):
  path = _write(tmp_path / "a.jsonl", _jsonl([{"text": "one"},
                                              {"text": "two", "meta": {}}]))
  docs, stats = data.read_documents(path)
  assert docs == ["one", "two"]
  assert stats == data.ReadStats(files=1, documents=2, skipped_lines=0)


def test_read_zst_streamed_multi_frame(tmp_path):
  cctx = zstandard.ZstdCompressor()
  path = tmp_path / "a.jsonl.zst"
  with open(path, "wb") as f:
    with cctx.stream_writer(f, closefd=False) as writer:  # No content size.
      writer.write(_jsonl([{"text": "héllo"}]))
    f.write(cctx.compress(_jsonl([{"text": "second frame"}])))
  with open(path, "rb") as f:
    params = zstandard.get_frame_parameters(f.read())
  assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
  docs, _ = data.read_documents(str(path))
  assert docs == ["héllo", "second frame"]


def test_read_txt_is_one_document(tmp_path):
  path = _write(tmp_path / "a.txt", "line one\nline two\n".encode())
  docs, stats = data.read_documents(path)
  assert docs == ["line one\nline two\n"]
  assert stats.documents == 1


def test_read_glob_comma_list_and_sequence(tmp_path):
  for name in ("b", "a"):
    _write(tmp_path / f"{name}.jsonl", _jsonl([{"text": name}]))
  txt = _write(tmp_path / "c.txt", b"c")
  pattern = str(tmp_path / "*.jsonl")
  assert data.read_documents(pattern)[0] == ["a", "b"]
  docs, stats = data.read_documents(f"{txt}, {pattern}")
  assert docs == ["c", "a", "b"]
  assert stats.files == 3
  assert data.read_documents([txt, pattern, txt])[0] == ["c", "a", "b"]


def test_read_skips_and_counts_malformed_lines(tmp_path, caplog):
  records = [{"text": "good"}, "{not json", {"meta": {}}, {"text": 7},
             {"text": ""}, {"text": "  \n"}, "[1, 2]", "", {"text": "fine"}]
  path = _write(tmp_path / "a.jsonl", _jsonl(records) + b"\xff\xfe\n")
  with caplog.at_level(logging.WARNING):
    docs, stats = data.read_documents(path)
  assert docs == ["good", "fine"]
  assert stats.skipped_lines == 7
  assert any(path in r.getMessage() and "7" in r.getMessage()
             for r in caplog.records)


@pytest.mark.parametrize("name", ["missing.jsonl", "miss*.jsonl"])
def test_read_missing_path_raises(tmp_path, name):
  path = str(tmp_path / name)
  with pytest.raises(data.DataError, match="no such data file") as info:
    data.read_documents(path)
  assert path in str(info.value)


def test_read_bad_suffix_raises(tmp_path):
  path = _write(tmp_path / "a.parquet", b"x")
  with pytest.raises(data.DataError, match="unsupported suffix") as info:
    data.read_documents(path)
  assert path in str(info.value)


@pytest.mark.parametrize("name,content", [
    ("a.jsonl", _jsonl(["oops", {"text": ""}])),
    ("a.txt", b" \n\t"),
    ("a.jsonl", b""),
])
def test_read_file_without_text_raises(tmp_path, name, content):
  path = _write(tmp_path / name, content)
  with pytest.raises(data.DataError, match="no usable text") as info:
    data.read_documents(path)
  assert path in str(info.value)


def test_read_empty_spec_raises():
  with pytest.raises(data.DataError, match="no data paths"):
    data.read_documents(" , ")


# Tokenizers.


def test_byte_tokenizer_round_trip():
  tok = data.build_tokenizer("byte")
  text = "In the beginning — ἐν ἀρχῇ 起初 🙂"
  ids = tok.encode(text)
  assert max(ids) < 256 and tok.eod_id == 256 and tok.vocab_size == 257
  assert tok.decode(ids + [tok.eod_id]) == text
  assert tok.encode_batch([text, "a"]) == [ids, [97]]
  assert tok.decode([0xe2, 0x80]) == "\ufffd"


def _save_bpe(tmp_path, special_tokens: list[str]) -> str:
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=300, special_tokens=special_tokens, show_progress=False,
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  corpus = ["and the earth was without form, and void"] * 20
  tok.train_from_iterator(corpus, trainer=trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return path


def test_hf_tokenizer_round_trip_and_eod(tmp_path):
  tok = data.build_tokenizer(_save_bpe(tmp_path, ["<pad>", "<|endoftext|>"]))
  assert isinstance(tok, data.HFTokenizer)
  assert tok.eod_id == 1
  text = "and the earth, ἀρχῇ\n"
  ids = tok.encode(text)
  assert tok.eod_id not in ids and max(ids) < tok.vocab_size
  assert len(ids) < len(text.encode())
  assert tok.decode(ids + [tok.eod_id]) == text
  assert tok.encode_batch([text, "void"]) == [ids, tok.encode("void")]


def test_hf_tokenizer_eod_choice(tmp_path):
  path = _save_bpe(tmp_path, ["<eos>", "</s>"])
  assert data.build_tokenizer(path).eod_id == 1
  assert data.build_tokenizer(path, eod_token="<eos>").eod_id == 0
  with pytest.raises(data.DataError, match="<bos>"):
    data.build_tokenizer(path, eod_token="<bos>")


def test_hf_tokenizer_errors_name_path(tmp_path):
  path = str(tmp_path / "tokenizer.json")
  with pytest.raises(data.DataError, match=re.escape(f"{path}: no such")):
    data.build_tokenizer(path)
  _save_bpe(tmp_path, ["<pad>"])
  with pytest.raises(data.DataError, match="<\\|endoftext\\|>.*</s>.*<eos>"):
    data.build_tokenizer(path)


def test_qwen2_tokenizer_vocabulary_round_trip_and_padding():
  tok = data.build_tokenizer("qwen2")
  assert isinstance(tok, data.QwenTokenizer)
  assert tok.eod_id == 151_643  # <|endoftext|>, the first id after the BPE
  assert tok.vocab_size == 151_643 + 208  # BPE + <|endoftext|>, im_start/end, 205 extras
  text = "In the beginning God created the heaven — ἐν ἀρχῇ 起初 🙂\n\tend"
  ids = tok.encode(text)
  assert max(ids) < tok.eod_id and len(ids) < len(text.encode()) // 2
  assert tok.decode(ids + [tok.eod_id]) == text
  assert tok.encode("Hello world") == [9707, 1879]  # Qwen2's ids for these words
  assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
  injected = tok.encode("a<|endoftext|>b")  # special strings in data stay text
  assert tok.eod_id not in injected and tok.decode(injected) == "a<|endoftext|>b"
  model = default_config().model
  assert padded_vocab_size(model, tok.vocab_size) == 151_936  # Qwen2's embedding size
  with pytest.raises(data.DataError, match="qwen2 tokenizer has a fixed eod"):
    data.build_tokenizer("qwen2", eod_token="</s>")


# Packing and splitting.


def test_pack_places_eod_after_each_document():
  tokens = data.pack_documents([[1, 2], [], [3]], eod_id=9)
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [1, 2, 9, 9, 3, 9])
  assert data.pack_documents([], eod_id=9).shape == (0,)


def _segment_ids_loop(inputs: np.ndarray, eod_id: int) -> np.ndarray:
  """Reference: walk each row, a new id after every eod."""
  out = np.zeros(inputs.shape, np.int32)
  for b, row in enumerate(inputs):
    current = 1
    for t, token in enumerate(row):
      out[b, t] = current
      current += int(token == eod_id)
  return out


def test_segment_ids_mark_each_document_start():
  ids = data.segment_ids(np.array([[5, 9, 9, 7, 8, 9], [9, 1, 2, 3, 9, 9]]), eod_id=9)
  np.testing.assert_array_equal(ids, [[1, 1, 2, 3, 3, 3], [1, 2, 2, 2, 2, 3]])
  rng = np.random.default_rng(0)
  for _ in range(5):
    inputs = rng.integers(0, 4, size=(3, 17))
    np.testing.assert_array_equal(data.segment_ids(inputs, 0), _segment_ids_loop(inputs, 0))


def test_batches_carry_segment_ids_of_their_documents():
  docs = [[1, 2, 3], [4], [5, 6, 7, 8, 1, 2], [3, 3]]
  ds = data.PackedDataset(data.pack_documents(docs, eod_id=0), SEQ_LEN, seed=1, eod_id=0)
  for batch in [ds.batch(s, 2) for s in range(3)] + list(ds.eval_batches(2)):
    assert batch["segment_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["segment_ids"], _segment_ids_loop(batch["inputs"], 0))


def test_index_stream_serves_steps_and_resumes_from_its_state():
  ds = _dataset(seed=4)
  stream = ds.stream(3)
  first = [next(stream) for _ in range(4)]
  for step, batch in enumerate(first):
    np.testing.assert_array_equal(batch["inputs"], ds.batch(step, 3)["inputs"])
  state = json.loads(json.dumps(stream.get_state()))
  resumed = ds.stream(3, state)
  np.testing.assert_array_equal(next(resumed)["inputs"], next(stream)["inputs"])


def test_split_is_deterministic_disjoint_and_complete():
  docs = [f"doc{i}" for i in range(100)]
  train, held_out = data.split_documents(docs, 0.1, seed=3)
  assert (train, held_out) == data.split_documents(docs, 0.1, seed=3)
  assert held_out != data.split_documents(docs, 0.1, seed=4)[1]
  assert len(held_out) == 10
  assert sorted(train + held_out) == sorted(docs)
  assert not set(train) & set(held_out)


def test_split_sizes_and_errors():
  for fraction in (0.01, 0.99):
    assert data.split_documents(["a", "b"], fraction, 1) == (["b"], ["a"])
  with pytest.raises(data.DataError, match="at least 2"):
    data.split_documents(["a"], 0.5, 0)
  for fraction in (0.0, 1.0, -0.1):
    with pytest.raises(data.DataError, match="eval_fraction"):
      data.split_documents(["a", "b"], fraction, 0)


# PackedDataset.

SEQ_LEN = 3


def _dataset(num_windows: int = 10, seed: int = 0,
             extra: int = 2) -> data.PackedDataset:
  """Window w starts with token w * (SEQ_LEN + 1); one document (no eod)."""
  tokens = np.arange(num_windows * (SEQ_LEN + 1) + extra)
  return data.PackedDataset(tokens, SEQ_LEN, seed, eod_id=-1)


def _window_ids(batch: dict) -> list[int]:
  return list(batch["inputs"][:, 0] // (SEQ_LEN + 1))


def test_batch_shapes_and_shifted_targets():
  ds = _dataset()
  assert ds.num_windows == 10
  b = ds.batch(0, 4)
  assert b["inputs"].shape == b["targets"].shape == (4, SEQ_LEN)
  assert b["inputs"].dtype == b["targets"].dtype == np.int32
  np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)


def test_batch_is_pure_function_of_seed_and_step():
  first = [_dataset(seed=1).batch(s, 4) for s in range(6)]
  again = _dataset(seed=1)
  for step in (5, 0, 3, 1, 4, 2):  # Any order, fresh object: same batches.
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(again.batch(step, 4)[key],
                                    first[step][key])
  other = [_window_ids(_dataset(seed=2).batch(s, 4)) for s in range(6)]
  assert other != [_window_ids(b) for b in first]


def test_every_window_once_per_epoch_and_wrap():
  ds = _dataset(seed=7)
  ids = np.concatenate([ds.window_ids(s, 4) for s in range(10)])
  for epoch in range(4):
    chunk = ids[epoch * 10:(epoch + 1) * 10]
    np.testing.assert_array_equal(
        chunk, np.random.default_rng((7, epoch)).permutation(10))
  assert list(ids[:10]) != list(ids[10:20])
  wrap = _window_ids(ds.batch(2, 4))  # Positions 8, 9 | 10, 11.
  assert wrap == list(ids[8:12])


def test_too_few_windows_raises():
  ds = _dataset(num_windows=3)
  with pytest.raises(data.DataError, match="seq_len") as info:
    ds.batch(0, 4)
  assert str(ds.num_tokens) in str(info.value)
  with pytest.raises(data.DataError, match="seq_len"):
    ds.eval_batches(4)
  with pytest.raises(data.DataError, match="seq_len"):
    data.PackedDataset(np.arange(SEQ_LEN), SEQ_LEN, seed=0, eod_id=-1)


def test_eval_batches_in_order_full_only():
  ds = _dataset(num_windows=10)
  assert [_window_ids(b) for b in ds.eval_batches(4)] == [[0, 1, 2, 3],
                                                          [4, 5, 6, 7]]
  assert len(list(ds.eval_batches(2, max_batches=3))) == 3
  assert len(list(ds.eval_batches(2, max_batches=None))) == 5


# Pipeline.


def test_build_data_small(tmp_path):
  path = _write(tmp_path / "a.jsonl",
                _jsonl([{"text": f"document number {i}"} for i in range(20)]))
  config = data_config(path=path, eval_fraction=0.25)
  built = data.build_data(config, seq_len=8, seed=0)
  assert built.stats.documents == 20
  assert built.train.num_tokens + built.eval.num_tokens == sum(
      len(f"document number {i}") + 1 for i in range(20))
  assert built.eval.num_tokens < built.train.num_tokens
  assert isinstance(built.tokenizer, data.ByteTokenizer)


def test_build_data_bundled_corpus():
  config = data_config(path=os.path.join(REPO, "data/kjv.jsonl.zst"),
                       eval_fraction=0.01)
  start = time.perf_counter()
  built = data.build_data(config, seq_len=256, seed=0)
  print(f"built bundled corpus in {time.perf_counter() - start:.2f}s")
  assert built.stats.documents == 1189 and built.stats.skipped_lines == 0
  assert built.train.num_tokens > 4e6
  assert len(list(built.eval.eval_batches(8))) > 0
  text = built.tokenizer.decode(built.train.batch(0, 1)["inputs"][0])
  assert len(text) > 0


def test_a_missing_optional_package_is_a_data_error_naming_it():
  from linmoe.data.errors import optional_module  # noqa: PLC0415
  with pytest.raises(data.DataError, match=r"data.tokenizer = .x. needs the no-such-pkg package \(pip install"):
    optional_module("no_such_module_linmoe", "no-such-pkg", "data.tokenizer = 'x'")
