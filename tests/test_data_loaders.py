"""The TFDS source (array-record, no TensorFlow) and the Grain loader, on datasets built on disk."""
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from linmoe import checkpoint, data
from linmoe.config import ConfigError, default_config, validate

NUM_TRAIN, NUM_VALIDATION = 40, 6


def text_of(split: str, i: int) -> str:
  """Document i of a split: unique, of varied length, with non-ASCII text."""
  return f"<{split} {i}> " + "ἐν ἀρχῇ " * (i % 7) + f"end {i}."


class LinmoeTinyText(tfds.core.GeneratorBasedBuilder):
  """A two-split text dataset with one config, written as array-record files."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "id": np.int32}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", NUM_TRAIN),
            "validation": self._generate_examples("validation", NUM_VALIDATION)}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, {"text": text_of(split, i), "id": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  LinmoeTinyText(data_dir=path, file_format="array_record").download_and_prepare()
  return path


def data_config(tfds_dir: str, **overrides):
  config = default_config().data
  config.update({"source": "tfds:linmoe_tiny_text:small", "tfds_dir": tfds_dir, **overrides})
  return config


def test_tfds_source_reads_splits_without_tensorflow(tfds_dir):
  docs = data.load_documents(data_config(tfds_dir, eval_split="validation"), seed=0)
  assert sorted(docs.train) == sorted(text_of("train", i) for i in range(NUM_TRAIN))
  assert sorted(docs.eval) == sorted(text_of("validation", i) for i in range(NUM_VALIDATION))
  assert docs.stats.documents == NUM_TRAIN + NUM_VALIDATION and docs.stats.files >= 2


def test_tfds_source_holds_out_a_seeded_share_of_train(tfds_dir):
  docs = data.load_documents(data_config(tfds_dir, eval_fraction=0.25), seed=3)
  assert len(docs.eval) == NUM_TRAIN // 4 and len(docs.train) == NUM_TRAIN - NUM_TRAIN // 4
  assert not set(docs.train) & set(docs.eval)
  assert list(docs.eval) == list(data.load_documents(data_config(tfds_dir, eval_fraction=0.25),
                                                     seed=3).eval)


@pytest.mark.parametrize("overrides,message", [
    ({"source": "tfds:no_such_dataset_xyz"}, "cannot open"),
    ({"source": "tfds:"}, "expected tfds:<name>"),
    ({"eval_split": "dev"}, "no split 'dev'.*train, validation"),
    ({"text_feature": "body"}, "no text feature 'body'"),
    ({"source": "hub:x"}, "must be 'files' or"),
])
def test_tfds_source_errors_name_the_setting(tfds_dir, overrides, message):
  with pytest.raises(data.DataError, match=message):
    docs = data.load_documents(data_config(tfds_dir, **overrides), seed=0)
    docs.train[0]  # noqa: B018 (a missing feature shows when a record is read)


def split_documents_of(batches, eod_id: int) -> list[list[int]]:
  """The documents that lie whole inside the token stream of `batches` (first and last cut)."""
  stream = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).ravel()
                           for b in batches])
  ends = np.flatnonzero(stream == eod_id)
  return [list(stream[a + 1:b]) for a, b in zip(ends[:-1], ends[1:])]


@pytest.fixture(scope="module")
def grain_data(tfds_dir):
  return data.build_data(data_config(tfds_dir, eval_split="validation", loader="grain"),
                         seq_len=16, seed=5)


def test_grain_loader_packs_shuffled_documents_with_segment_ids(grain_data):
  tok = grain_data.tokenizer
  stream = grain_data.train.stream(4)
  batches = [next(stream) for _ in range(12)]  # > 1 epoch of the 40 training documents
  for b in batches:
    assert b["inputs"].shape == b["targets"].shape == (4, 16) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["segment_ids"], data.segment_ids(b["inputs"], tok.eod_id))
  texts = [tok.decode(d) for d in split_documents_of(batches, tok.eod_id)]
  assert set(texts) <= {text_of("train", i) for i in range(NUM_TRAIN)}
  first_epoch = texts[:NUM_TRAIN - 1]
  assert len(set(first_epoch)) == len(first_epoch)  # each document once per epoch
  assert first_epoch != sorted(first_epoch, key=lambda t: int(t.split()[1][:-1]))  # shuffled


def test_grain_loader_shards_documents_by_process(grain_data):
  tok = grain_data.tokenizer
  seen = []
  for index in range(2):
    it = iter(grain_data.train.pipeline(4, process_index=index, process_count=2))
    windows = [next(it)["tokens"] for _ in range(6)]
    assert windows[0].shape == (2, 17)
    batches = [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in windows]
    seen.append({tok.decode(d) for d in split_documents_of(batches, tok.eod_id)})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_grain_stream_resumes_from_its_json_state(grain_data):
  stream = grain_data.train.stream(3)
  for _ in range(5):
    next(stream)
  state = json.loads(json.dumps(stream.get_state()))
  expected = [next(stream) for _ in range(4)]
  resumed = grain_data.train.stream(3, state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(data.DataError, match="not a Grain loader state"):
    grain_data.train.stream(3, {"step": 5})


def test_grain_position_round_trips_through_a_checkpoint(grain_data, tmp_path):
  """What the trainer does at a save and on resume (linmoe/trainer.py), without a model."""
  stream = grain_data.train.stream(2)
  for _ in range(7):
    next(stream)
  manager = checkpoint.checkpoint_manager(str(tmp_path), 2)
  checkpoint.save(manager, 7, {"step": np.int32(7)}, stream.get_state())
  manager.wait_until_finished()
  restored = checkpoint.restore_data_state(manager, 7)
  resumed = grain_data.train.stream(2, restored)
  for _ in range(3):
    np.testing.assert_array_equal(next(resumed)["inputs"], next(stream)["inputs"])


@pytest.mark.parametrize("key,value,message", [
    ("loader", "tf.data", "data.loader = 'tf.data': must be one of index, grain"),
    ("source", "hf:wikitext", "data.source = 'hf:wikitext': must be 'files' or 'tfds:"),
])
def test_config_validation_names_bad_data_keys(key, value, message):
  config = default_config()
  config.data[key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(config, device_count=1)
