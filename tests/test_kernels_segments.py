"""Document boundaries (segment_ids) in every recurrence op and impl: a packed batch equals separate runs of
each document (outputs, final state of each row's last document, gradients of every input)."""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.kernels import common
# The gla tests' sizes, tolerances and checks; `_fp32_matmuls` is their autouse fixture (true fp32 matmuls).
from tests.test_kernels_delta_rule import DELTA, _delta_inputs
from tests.test_kernels_diagonal_ssm import SSM
from tests.test_kernels_dplr import DPLR, _dplr_inputs
from tests.test_kernels_rwkv6 import BONUS, _bonus_inputs
from tests.test_kernels_simple_gla_gla import (BATCH, CHUNK, FAMILIES, FP32_TOL, _assert_close,
                                               _fp32_matmuls, _inputs, _normal)
from tests.test_kernels_titans import TITANS, _titans_inputs

# Documents per packed row (chunks of CHUNK = 16): row 0 has one-token documents at 0 and 16, boundaries on
# the chunk edge 16 and inside chunks (1, 17, 22), a chunk with three boundaries and a last document across
# the edge 32; row 1 has a document over two chunks, a boundary on the edge 32 and a one-token last document.
LENGTHS = ((1, 15, 1, 5, 18), (3, 29, 7, 1))
SEQ = sum(LENGTHS[0])
BOUNDARIES = sorted({int(s) for row in LENGTHS for s in np.cumsum(row)[:-1]})
assert all(sum(row) == SEQ for row in LENGTHS) and len(LENGTHS) == BATCH
assert {CHUNK, 2 * CHUNK} <= set(BOUNDARIES) and SEQ % CHUNK  # boundaries on chunk edges, a ragged end


@dataclasses.dataclass(frozen=True)
class Case:
  """An op under test: `op(**inputs, impl=, segment_ids=, **tiling)` and its packed inputs (seq SEQ)."""
  op: Callable
  inputs: Callable  # seed -> dict of the op's keyword inputs, initial_state included
  tiling: dict


CASES = {
    "simple_gla": Case(kernels.simple_gla, lambda s: _inputs(FAMILIES["simple_gla"], SEQ, s),
                       FAMILIES["simple_gla"].tiling),
    "gla": Case(kernels.gla, lambda s: _inputs(FAMILIES["gla"], SEQ, s), FAMILIES["gla"].tiling),
    # DeltaNet (g=None) runs the same implementations, on g = 0.
    "delta_rule": Case(kernels.delta_rule, lambda s: _delta_inputs(SEQ, s), DELTA.tiling),
    "gla_bonus": Case(kernels.gla_bonus, lambda s: _bonus_inputs(SEQ, s), BONUS.tiling),
    "diagonal_ssm": Case(kernels.diagonal_ssm, lambda s: _inputs(SSM, SEQ, s), SSM.tiling),
    "dplr": Case(kernels.dplr, lambda s: _dplr_inputs(SEQ, s), DPLR.tiling),
    "titans": Case(kernels.titans, lambda s: _titans_inputs(SEQ, s), TITANS.tiling),
}


def _pallas_inputs(family: str, seed: int) -> dict:
  """The family's inputs with value_dim doubled to 16, the smallest tile of the Pallas kernels."""
  inputs = _inputs(FAMILIES[family], SEQ, seed)
  rng = np.random.default_rng(seed + 2000)
  wide = lambda x: jnp.concatenate([x, _normal(rng, x.shape)], axis=-1)  # noqa: E731
  return inputs | {"v": wide(inputs["v"]), "initial_state": wide(inputs["initial_state"])}


# impl="pallas" at its tile sizes: gla's chunk of 32 (sub-chunks of 16) has the boundary 32 of row 1 on its edge
# and the others inside.
PALLAS_CASES = {
    "simple_gla": Case(kernels.simple_gla, lambda s: _pallas_inputs("simple_gla", s), {"chunk_size": CHUNK}),
    "gla": Case(kernels.gla, lambda s: _pallas_inputs("gla", s), {"chunk_size": 32, "sub_chunk_size": 16}),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each document of the packed batch lies, and the index arrays between the two layouts.

  Separate layout: one document per row [n_docs, max_len], zero-padded. A row's first document starts at
  0 (its initial state meets its first token); the others end at max_len, so that their zero padding comes
  first and meets a zero state, which no op changes (zero padding after the end would move Titans'
  memory by its momentum).
  """
  segment_ids: np.ndarray  # [batch, seq] int32, ids that do not start at 0
  row: np.ndarray  # [n_docs], the packed row of each document
  start: np.ndarray  # [n_docs]
  length: np.ndarray  # [n_docs]
  first: np.ndarray  # [batch], each row's first document
  last: np.ndarray  # [batch], each row's last document

  @property
  def max_len(self) -> int:
    return int(self.length.max())

  @property
  def offset(self) -> np.ndarray:
    """[n_docs], where each document starts in its separate row."""
    return np.where(np.isin(np.arange(len(self.row)), self.first), 0, self.max_len - self.length)

  def separate(self, x: jax.Array) -> jax.Array:
    """[batch, seq, ...] -> [n_docs, max_len, ...], zeros outside each document."""
    pos = np.arange(self.max_len)[None] - self.offset[:, None]
    valid = (pos >= 0) & (pos < self.length[:, None])
    cols = np.where(valid, self.start[:, None] + pos, 0)
    gathered = x[self.row[:, None], cols]
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), gathered, 0)

  def packed(self, x: jax.Array) -> jax.Array:
    """[n_docs, max_len, ...] -> [batch, seq, ...], the inverse of `separate`."""
    doc = np.repeat(np.arange(len(self.row)), self.length).reshape(self.segment_ids.shape)
    pos = np.arange(self.segment_ids.shape[1])[None] - self.start[doc] + self.offset[doc]
    return x[doc, pos]

  def first_doc_only(self, state: jax.Array) -> jax.Array:
    """A row's state [batch, ...] for its first document, zeros for the others: [n_docs, ...]."""
    is_first = np.isin(np.arange(len(self.row)), self.first).reshape(-1, *[1] * (state.ndim - 1))
    return jnp.where(is_first, state[self.row], 0)

  def last_doc_only(self, state: jax.Array) -> jax.Array:
    """A row's state [batch, ...] for its last document, zeros for the others: [n_docs, ...]."""
    is_last = np.isin(np.arange(len(self.row)), self.last).reshape(-1, *[1] * (state.ndim - 1))
    return jnp.where(is_last, state[self.row], 0)


def layout(row_lengths: Sequence[Sequence[int]]) -> Layout:
  """The Layout of packed rows holding documents of the given lengths (each row's lengths sum to seq)."""
  lengths = np.concatenate(row_lengths)
  row = np.repeat(np.arange(len(row_lengths)), [len(r) for r in row_lengths])
  start = np.concatenate([np.cumsum((0, *r[:-1])) for r in row_lengths])
  n_docs = np.cumsum([len(r) for r in row_lengths])
  ids = np.concatenate([np.repeat(np.arange(len(r)), r) + 7 * b for b, r in enumerate(row_lengths)])
  return Layout(ids.reshape(len(row_lengths), -1).astype(np.int32), row, start, lengths,
                first=np.concatenate([[0], n_docs[:-1]]), last=n_docs - 1)


LAYOUT = layout(LENGTHS)


@functools.partial(jax.jit, static_argnames=("case", "impl"))
def _vjp(inputs: dict, segment_ids: jax.Array | None, cotangent: tuple, case: str,
         impl: str) -> tuple[tuple, dict]:
  """(o, final_state) of the case's op and the gradients of every input under `cotangent` (the case of
  PALLAS_CASES for impl "pallas" where it has one, of CASES otherwise)."""
  spec = PALLAS_CASES[case] if impl == "pallas" and case in PALLAS_CASES else CASES[case]
  run = lambda x: spec.op(**x, segment_ids=segment_ids, impl=impl, **spec.tiling)
  outputs, vjp = jax.vjp(run, inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


def _is_token_input(x) -> bool:
  return isinstance(x, jax.Array) and x.shape[:2] == (BATCH, SEQ)


def assert_packed_matches_separate(case: str, inputs: dict, impl: str, seed: int) -> None:
  """The op with segment ids on the packed batch, against the token loop without them on each document
  alone (zero initial state but for each row's first document): outputs, the final state of each row's
  last document, and the gradients of every input, under random cotangents of o and the final state."""
  lay = LAYOUT
  init = inputs["initial_state"]
  separate = {n: lay.separate(x) if _is_token_input(x) else x for n, x in inputs.items()}
  separate["initial_state"] = jax.tree.map(lay.first_doc_only, init)
  rng = np.random.default_rng(seed + 1000)
  cotangent = (_normal(rng, inputs["v"].shape), jax.tree.map(lambda s: _normal(rng, s.shape), init))
  sep_cotangent = (lay.separate(cotangent[0]), jax.tree.map(lay.last_doc_only, cotangent[1]))

  (o, state), grads = _vjp(inputs, jnp.asarray(lay.segment_ids), cotangent, case, impl)
  (o_ref, state_ref), grads_ref = _vjp(separate, None, sep_cotangent, case, "naive")
  _assert_close(o, lay.packed(o_ref), FP32_TOL, "o")
  for part, ref in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref)):
    _assert_close(part, ref[lay.last], FP32_TOL, "final_state")
  for name, grad in grads.items():
    if name == "initial_state":
      for part, ref in zip(jax.tree.leaves(grad), jax.tree.leaves(grads_ref[name])):
        _assert_close(part, ref[lay.first], FP32_TOL, "grad initial_state")
    elif grad is not None:
      ref = lay.packed(grads_ref[name]) if _is_token_input(inputs[name]) else grads_ref[name]
      _assert_close(grad, ref, FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_packed_matches_separate(case, impl):
  assert_packed_matches_separate(case, CASES[case].inputs(0), impl, seed=0)


def _hostile_boundaries(inputs: dict) -> dict:
  """Every log decay (g, g_momentum) -inf at the boundaries of both rows and -1e4 on the token before."""
  hostile = {}
  for name in ("g", "g_momentum"):
    if inputs.get(name) is not None:
      g = inputs[name].at[:, np.array(BOUNDARIES)].set(-jnp.inf)
      hostile[name] = g.at[:, np.array(BOUNDARIES) - 1].set(-1e4)
  return inputs | hostile


@pytest.mark.parametrize("case", CASES)
def test_hostile_gates_at_boundaries(case):
  """-inf and -1e4 decays next to a reset: finite everywhere and still the separate runs (the compiled
  functions of test_packed_matches_separate, other values)."""
  for impl in ("naive", "chunked"):
    assert_packed_matches_separate(case, _hostile_boundaries(CASES[case].inputs(1)), impl, seed=1)


def test_impl_without_segment_ids_refuses_them_and_auto_falls_back():
  segment_ids = jnp.asarray(LAYOUT.segment_ids)
  impls = {"chunked": lambda **kw: kw, "pallas": lambda **kw: "pallas"}
  with pytest.raises(ValueError, match="impl='pallas' does not support segment_ids"):
    common.select_impl(impls, "pallas", "pallas", segment_ids)
  assert common.select_impl(impls, "auto", "pallas", segment_ids)() == {"segment_ids": segment_ids}
  assert common.select_impl(impls, "auto", "pallas") is impls["pallas"]
  taking = common.select_impl(impls, "auto", "pallas", segment_ids, (*common.SEGMENT_IMPLS, "pallas"))
  assert taking() == "pallas"


@pytest.mark.parametrize("case", PALLAS_CASES)
def test_pallas_packed_matches_separate(case):
  """Interpret mode; then hostile gates next to the boundaries, on the same compiled functions."""
  inputs = PALLAS_CASES[case].inputs(0)
  assert_packed_matches_separate(case, inputs, "pallas", seed=0)
  assert_packed_matches_separate(case, _hostile_boundaries(inputs), "pallas", seed=0)


@pytest.mark.parametrize("case", CASES)
def test_bad_segment_ids_raise(case):
  inputs = CASES[case].inputs(0)
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    CASES[case].op(**inputs, segment_ids=jnp.zeros((BATCH, SEQ - 1), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be an integer array"):
    CASES[case].op(**inputs, segment_ids=jnp.zeros((BATCH, SEQ), jnp.float32))
