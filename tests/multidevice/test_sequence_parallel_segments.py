"""Packed documents across sequence shards: LASP-2 (both carries), the short convolution's left context,
sliding-window attention and LASP-2H attention with segment ids, split over data=2,sequence=4 (10 tokens
per shard, chunks of 8) against the same functions on whole sequences on one device: outputs, final
states and the gradients w.r.t. every float input (test_sequence_parallel.py's harness).

The four rows place the boundaries inside shards (with a one-token document, and a document that crosses
a boundary-free shard), on shard edges only, nowhere, and at every few tokens.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe.layers.conv import ShortConv
from linmoe.layers.lsm import FAMILIES
from linmoe.layers.window_attention import SlidingWindowAttention
from linmoe.parallel import lasp2, sequence
from tests.multidevice.test_sequence_parallel import (HEADS, KEY_DIM, SEQ, TILING, VALUE_DIM,
                                                      assert_split_matches_whole)

BATCH = 4
MESH = "data=2,sequence=4"
STARTS = ((3, 17, 18, 33), (10, 30), (), (4, 7, 8, 20, 21, 29, 35))  # document starts of each row
# One family per carry (the segment logic is the carry's, the same for all its families): DecayCarry with
# gla_bonus (per-key decay, read before the update, an input without a seq axis), MatrixCarry with titans
# (the two-part state).
FAMILY_CASES = {"gla_bonus": {"chunk_size": 8, "sub_chunk_size": 4}, "titans": TILING}


def _segment_ids() -> jax.Array:
  """[BATCH, SEQ] int32, a new id at each of the row's STARTS."""
  starts = np.zeros((BATCH, SEQ), np.int32)
  for row, positions in enumerate(STARTS):
    starts[row, list(positions)] = 1
  return jnp.asarray(1 + np.cumsum(starts, axis=1), jnp.int32)


def _normal(rng: np.random.Generator, *shape: int) -> jax.Array:
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _family_inputs(family: str, rng: np.random.Generator) -> tuple:
  lead = (BATCH, SEQ, HEADS)
  q, k, v = _normal(rng, *lead, KEY_DIM), _normal(rng, *lead, KEY_DIM), _normal(rng, *lead, VALUE_DIM)
  unit_k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  gate = lambda *shape: jax.nn.log_sigmoid(_normal(rng, *lead, *shape) + 2.0)
  unit = lambda: jax.nn.sigmoid(_normal(rng, *lead))
  if family == "gla_bonus":
    return q, k, v, gate(KEY_DIM), _normal(rng, HEADS, KEY_DIM)
  return q, unit_k, v, 0.5 * unit(), gate(), gate()


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_lasp2_with_segments_matches_one_device(family):
  rng = np.random.default_rng(0)
  inputs = _family_inputs(family, rng)
  state = _normal(rng, BATCH, HEADS, KEY_DIM, VALUE_DIM)
  state = (state, 0.5 * state) if family == "titans" else state
  ids = _segment_ids()
  op = functools.partial(FAMILIES[family].sequence, impl="chunked", **FAMILY_CASES[family])

  def fn(inputs, state):
    if sequence.is_split("train"):
      return lasp2.lasp2(op, FAMILIES[family].carry, inputs, initial_state=state, segment_ids=ids)
    return op(*inputs, initial_state=state, segment_ids=ids)

  assert_split_matches_whole(family, fn, (inputs, state), MESH, batch=BATCH)


def _layer(name: str):
  """(fn of float args whose mode follows the mesh, args) for a token-mixing layer with segment ids."""
  rng, ids = np.random.default_rng(1), _segment_ids()
  qkv = tuple(_normal(rng, BATCH, SEQ, HEADS, KEY_DIM) for _ in "qkv")
  if name == "short_conv":
    conv = ShortConv(mode="train", width=4)
    x = _normal(rng, BATCH, SEQ, 3)
    return (lambda params, x: conv.apply(params, x, ids)), (conv.init(jax.random.key(0), x), x)
  if name == "window_attention":
    window = SlidingWindowAttention(mode="train", window=6)
    return (lambda q, k, v: window.apply({}, q, k, v, 0, ids)), qkv
  same = ids[:, None, :, None] == ids[:, None, None, :]
  return (lambda q, k, v: (sequence.gathered_attention(q, k, v, ids) if sequence.is_split("train")
                           else jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True))), qkv


@pytest.mark.parametrize("layer", ["short_conv", "window_attention", "attention"])
def test_layer_with_segments_across_shard_borders_matches_one_device(layer):
  fn, args = _layer(layer)
  assert_split_matches_whole(layer, fn, args, MESH, batch=BATCH)
