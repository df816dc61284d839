"""delta_rule impl="pallas" against the token loop (naive), in Pallas interpret mode on the CPU.

Few shapes, so that the interpreted kernels compile once per shape: the seeds and hostile values reuse them.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.kernels import common
from linmoe.kernels.pallas import delta as pallas_delta
# `_fp32_matmuls` is the pallas tests' autouse fixture (true fp32 matmuls), imported to apply here too.
from tests.test_kernels_pallas import FP32_TOL, _assert_close, _fp32_matmuls, hostile_gates  # noqa: F401
from tests.test_kernels_segments import BATCH, SEQ, _hostile_boundaries, assert_packed_matches_separate

SEQ_LEN, CHUNK = 37, 16  # Three chunks, the last one padded.
# (batch, heads, key_dim, value_dim): two heads; and two key blocks in the key-gradient programs.
SMALL, WIDE_KEYS = (1, 2, 64, 64), (1, 1, 128, 64)
PACKED = (BATCH, 2, 64, 64)  # The packed rows of tests/test_kernels_segments.py (seq SEQ), two heads.
SEEDS = (0, 1)
# The module: the package attribute `delta_rule` is the op.
DELTA_RULE_MODULE = importlib.import_module("linmoe.kernels.delta_rule")


def _inputs(dims: tuple[int, int, int, int], seed: int, with_state: bool, gated: bool,
            seq_len: int = SEQ_LEN) -> dict:
  """fp32 q, L2-normalised k, v, beta in (0, 1), a moderate log decay (or None), an initial state (or None)."""
  batch, heads, key_dim, value_dim = dims
  rng = np.random.default_rng(seed)
  lead = (batch, seq_len, heads)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  k = normal((*lead, key_dim))
  return {
      "q": normal((*lead, key_dim)),
      "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
      "v": normal((*lead, value_dim)),
      "beta": jax.nn.sigmoid(normal(lead)),
      "g": jax.nn.log_sigmoid(2.0 + normal(lead)) if gated else None,
      "initial_state": normal((batch, heads, key_dim, value_dim)) if with_state else None,
  }


def _vjp_of_impl(inputs: dict, cotangent: tuple, impl: str, chunk_size: int = CHUNK) -> tuple[tuple, dict]:
  """(o, final_state) and the gradients of every input (None entries stay None)."""
  outputs, vjp = jax.vjp(lambda x: kernels.delta_rule(**x, impl=impl, chunk_size=chunk_size), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


_forward_and_vjp = jax.jit(_vjp_of_impl, static_argnames="impl")


def _assert_pallas_matches_naive(inputs: dict, seed: int, forward_and_vjp=_forward_and_vjp,
                                 impl: str = "pallas") -> None:
  """Outputs, final state and the gradients of q, k, v, beta, g and the initial state equal naive's (the pallas
  side run by `forward_and_vjp`, as `impl`)."""
  rng = np.random.default_rng(seed + 1000)
  batch, _, heads, key_dim = inputs["q"].shape
  value_dim = inputs["v"].shape[-1]
  cotangent = (jnp.asarray(rng.standard_normal(inputs["v"].shape), jnp.float32),
               jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32))
  (o_ref, s_ref), g_ref = _forward_and_vjp(inputs, cotangent, "naive")
  (o, s), grads = forward_and_vjp(inputs, cotangent, impl)
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(s, s_ref, FP32_TOL, "final_state")
  for name, grad in grads.items():
    if inputs[name] is not None:
      _assert_close(grad, g_ref[name], FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dims,with_state,gated", [(SMALL, True, True), (WIDE_KEYS, False, False)])
def test_pallas_matches_naive(dims, with_state, gated, seed):
  _assert_pallas_matches_naive(_inputs(dims, seed, with_state, gated), seed)


def test_wide_value_block_and_long_chunk_match_naive(monkeypatch):
  """The scans' wide value block, which the sizes above (few batch * head programs) do not pick, and a chunk of
  64 (four diagonal blocks in the WY kernel's inverse; 16 above is one)."""
  monkeypatch.setattr(pallas_delta, "FEW_PROGRAMS", 0)
  inputs = _inputs(WIDE_KEYS, seed=2, with_state=True, gated=True)
  forward_and_vjp = jax.jit(functools.partial(_vjp_of_impl, chunk_size=64), static_argnames="impl")
  _assert_pallas_matches_naive(inputs, seed=2, forward_and_vjp=forward_and_vjp)


@pytest.mark.parametrize("pattern", ["zero", "scattered"])
def test_hostile_gates_and_beta_match_naive(pattern):
  """g = 0 everywhere, or -30, -1e4, -inf on scattered tokens (chunk edges included) amid weak decay; beta of
  exactly 0 and 1 on a third of the tokens each."""
  inputs = _inputs(SMALL, seed=3, with_state=True, gated=True)
  beta = np.array(inputs["beta"])
  beta[:, 0::3], beta[:, 1::3] = 0.0, 1.0
  inputs |= {"g": hostile_gates(inputs["g"].shape, pattern, seed=3), "beta": jnp.asarray(beta)}
  _assert_pallas_matches_naive(inputs, seed=3)


@pytest.mark.parametrize("gated", [True, False])
def test_packed_matches_separate(gated):
  """Packed documents (boundaries inside chunks, on chunk edges, one-token documents, a ragged end) equal
  separate runs of the token loop: outputs, final state, gradients of q, k, v, beta, g and the initial state."""
  inputs = _inputs(PACKED, seed=4, with_state=True, gated=gated, seq_len=SEQ)
  assert_packed_matches_separate("delta_rule", inputs, "pallas", seed=4)


@pytest.fixture
def split_scans(monkeypatch) -> str:
  """An impl name for the Pallas kernels with each scan split into 4 runs (3 chunks at SEQ_LEN: runs of one
  chunk and an empty one); a name of its own, so that no compiled "pallas" call is reused."""
  name = "pallas_4_runs"
  monkeypatch.setitem(DELTA_RULE_MODULE._IMPLS, name, functools.partial(pallas_delta.pallas_delta_rule, runs=4))
  monkeypatch.setattr(DELTA_RULE_MODULE, "_SEGMENT_IMPLS", (*DELTA_RULE_MODULE._SEGMENT_IMPLS, name))
  return name


def test_split_scans_match_naive(split_scans):
  """Scans cut into runs (each run's affine map, the runs' entry states folded, every run walked again): the
  same outputs, final state and gradients as the token loop."""
  _assert_pallas_matches_naive(_inputs(SMALL, seed=6, with_state=True, gated=True), seed=6, impl=split_scans)


def test_split_scans_packed_match_separate(split_scans):
  """Split scans with documents starting inside and at the edges of the runs."""
  inputs = _inputs(PACKED, seed=7, with_state=True, gated=True, seq_len=SEQ)
  assert_packed_matches_separate("delta_rule", inputs, split_scans, seed=7)


def test_hostile_gates_at_boundaries():
  """-inf and -1e4 log decays next to the boundaries: finite and still the separate runs."""
  inputs = _inputs(PACKED, seed=5, with_state=True, gated=True, seq_len=SEQ)
  assert_packed_matches_separate("delta_rule", _hostile_boundaries(inputs), "pallas", seed=5)


@pytest.mark.parametrize("dims,chunk_size,match", [
    ((1, 1, 32, 64), CHUNK, "key_dim"), ((1, 1, 64, 96), CHUNK, "value_dim"), (SMALL, 48, "chunk_size"),
    (SMALL, 128, "chunk_size"),
])
def test_unsupported_sizes_raise(dims, chunk_size, match):
  inputs = _inputs(dims, seed=0, with_state=False, gated=True)
  with pytest.raises(ValueError, match=match):
    kernels.delta_rule(**inputs, impl="pallas", chunk_size=chunk_size)


@pytest.mark.parametrize("runs", [0, 3])
def test_runs_not_a_power_of_two_raise(runs):
  inputs = _inputs(SMALL, seed=0, with_state=False, gated=True)
  inputs["g"] = inputs["g"][..., None]
  with pytest.raises(ValueError, match="runs"):
    pallas_delta.pallas_delta_rule(**inputs, scale=1.0, chunk_size=CHUNK, runs=runs)


def test_auto_is_chunked_off_gpu():
  inputs = _inputs(SMALL, seed=0, with_state=False, gated=True)
  assert DELTA_RULE_MODULE.auto_impl(inputs["q"], inputs["v"], CHUNK) == "chunked"


def test_pallas_takes_segment_ids_under_auto():
  """delta_rule's own list of segment-capable impls keeps "pallas" (what auto picks on a GPU) with segment ids,
  where the decay ops fall back to "chunked"."""
  segment_ids = jnp.zeros((1, 4), jnp.int32)
  impls = {"chunked": lambda **kw: "chunked", "pallas": lambda **kw: kw}
  select = functools.partial(common.select_impl, impls, "auto", "pallas", segment_ids)
  assert select(DELTA_RULE_MODULE._SEGMENT_IMPLS)() == {"segment_ids": segment_ids}
  assert select()() == "chunked"
