"""Shared fixtures: a small corpus and a tiny config, so the whole suite compiles few shapes."""
import io
import json
import os

import pytest
import zstandard

from linmoe.config import default_config

BUNDLED_CORPUS = "data/kjv.jsonl.zst"
# tests/multidevice needs 8 devices from process start: tests/test_multidevice.py runs it apart.
collect_ignore = [] if os.environ.get("LINMOE_MULTIDEVICE") == "1" else ["multidevice"]
# Modules whose tests compile nothing in common (one model or one 8-device subprocess each): under
# pytest-xdist they are spread over the workers test by test, and they run first, as the longest.
SPREAD_MODULES = ("test_multidevice", "test_lsm_zoo", "test_scan_remat")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`pytest -n 2` (the README's test command) schedules by the groups below, in the collected order."""
  from xdist.scheduler import LoadGroupScheduling  # noqa: PLC0415 - only where xdist runs.
  config.option.loadscopereorder = False
  return LoadGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items) -> None:
  """Groups the tests for pytest-xdist: a module's tests run on one worker, in order, so they share their
  compiled functions (JAX caches them per process); the tests of SPREAD_MODULES go one by one, and first.
  Without xdist the groups are unused marks and only the order changes."""
  del config

  def module(item) -> str:
    return item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")

  rank = {name: i for i, name in enumerate(SPREAD_MODULES)}
  items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: the other modules keep their order
  for item in items:
    item.add_marker(pytest.mark.xdist_group(item.nodeid if module(item) in rank else module(item)))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
  """The first 120 chapters of the bundled corpus as plain jsonl (fast to read and tokenize)."""
  with open(BUNDLED_CORPUS, "rb") as f:
    reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
    lines = [next(reader) for _ in range(120)]
  path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
  path.write_text("".join(lines))
  assert json.loads(lines[0])["text"]
  return str(path)


def tiny_config(corpus: str, workdir: str, **model_overrides):
  """A 2-block model with d_model 32 and a 4-expert MoE; 32-token sequences."""
  c = default_config()
  c.workdir = workdir
  c.data.path = corpus
  c.data.eval_fraction = 0.05
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.chunk_size = 32, 2, 2, 16
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff = 4, 2, 32
  for key, value in model_overrides.items():
    m[key] = value
  t = c.train
  t.steps, t.batch_size, t.seq_len, t.warmup_steps = 8, 4, 32, 2
  t.log_every, t.eval_every, t.ckpt_every, t.eval_batches = 2, 4, 4, 2
  return c
