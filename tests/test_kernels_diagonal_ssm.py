"""diagonal_ssm: the chunk-wise associative scan and the decode step against the token loop (naive)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
# The gla tests' sizes, tolerances, input generators and checks; `_fp32_matmuls` is their autouse fixture
# (true fp32 matmuls), imported to apply here too.
from tests.test_kernels_simple_gla_gla import (assert_matches_naive, op_vjp, BATCH, BF16_TOL, CHUNK,
                                               FP32_TOL, HEADS, KEY_DIM, SEEDS, VALUE_DIM, Family,
                                               _assert_close, _fp32_matmuls, _hostile_gates, _inputs)


class FullDecay(Family):
  """A family whose log decay has the full state shape [key_dim, value_dim] per head and token."""

  def decay_shape(self, seq_len: int) -> tuple[int, ...]:
    return (BATCH, seq_len, HEADS, KEY_DIM, VALUE_DIM)


SSM = FullDecay(kernels.diagonal_ssm, kernels.diagonal_ssm_step, True, {"chunk_size": CHUNK})
NAMES = ("q", "k", "v", "g")


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _forward(inputs: dict, impl: str, chunk_size: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  return kernels.diagonal_ssm(**inputs, impl=impl, chunk_size=chunk_size)


_forward_and_vjp = functools.partial(op_vjp, _forward)
_assert_scan_matches_naive = functools.partial(assert_matches_naive, _forward, impl="scan")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq_len,with_state", [(37, False), (77, True)])
def test_scan_matches_naive(seq_len, with_state, seed):
  _assert_scan_matches_naive(_inputs(SSM, seq_len, seed, with_state), seed)


def test_naive_matches_definition():
  """The token loop against the update as written, in float64 NumPy, with a -inf decay entry."""
  inputs = _inputs(SSM, 5, seed=4)
  inputs["g"] = inputs["g"].at[:, 2, :, 0].set(-jnp.inf)
  o, state = _forward(inputs, "naive")
  q, k, v, g, s = (np.asarray(inputs[n], np.float64) for n in (*NAMES, "initial_state"))
  o_ref = np.zeros(v.shape)
  for t in range(v.shape[1]):
    s = np.exp(g[:, t]) * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    o_ref[:, t] = KEY_DIM**-0.5 * np.einsum("bhkv,bhk->bhv", s, q[:, t])
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(state, s, FP32_TOL, "state")


@pytest.mark.parametrize("impl,chunk_size", [("scan", 1), ("chunked", 64)])  # 64: one chunk > seq
def test_chunk_sizes_and_chunked_name(impl, chunk_size):
  inputs = _inputs(SSM, 37, seed=7)
  o_ref, s_ref = _forward(inputs, "naive")
  o, s = _forward(inputs, impl, chunk_size)
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(s, s_ref, FP32_TOL, "final_state")


def test_step_loop_matches_naive():
  inputs = _inputs(SSM, 77, seed=3)
  o_ref, s_ref = _forward(inputs, "naive")
  step = jax.jit(kernels.diagonal_ssm_step)
  state, outputs = inputs["initial_state"], []
  for t in range(77):
    o_t, state = step(*(inputs[n][:, t] for n in NAMES), state)
    outputs.append(o_t)
  assert state.dtype == jnp.float32
  _assert_close(jnp.stack(outputs, axis=1), o_ref, FP32_TOL, "o")
  _assert_close(state, s_ref, FP32_TOL, "state")


def test_single_token_scan_is_one_step():
  inputs = _inputs(SSM, 1, seed=6)
  o, state = _forward(inputs, "scan")
  o_ref, state_ref = kernels.diagonal_ssm_step(*(inputs[n][:, 0] for n in NAMES), inputs["initial_state"])
  _assert_close(o[:, 0], o_ref, FP32_TOL, "o")
  _assert_close(state, state_ref, FP32_TOL, "state")


@pytest.mark.parametrize("pattern", ["zero", "scattered", "per_channel"])
def test_hostile_gates_finite_and_match_naive(pattern):
  for seed in SEEDS[:2]:
    inputs = _inputs(SSM, 77, seed) | {"g": _hostile_gates(SSM, pattern, 77, seed)}
    _assert_scan_matches_naive(inputs, seed)


def test_bf16_inputs():
  inputs = _inputs(SSM, 77, seed=5)
  o_ref, s_ref = _forward(inputs, "naive")
  o, s = _forward({n: x.astype(jnp.bfloat16) for n, x in inputs.items()}, "scan")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_close(s, s_ref, BF16_TOL, "final_state")


def test_unknown_impl_and_bad_chunk_size_raise():
  inputs = _inputs(SSM, 5, seed=0)
  with pytest.raises(ValueError, match="'naive', 'scan', 'chunked', 'auto'"):
    kernels.diagonal_ssm(**inputs, impl="fast")
  with pytest.raises(ValueError, match="chunk_size"):
    kernels.diagonal_ssm(**inputs, chunk_size=0)


@pytest.mark.parametrize("name,shape,match", [
    ("k", (BATCH, 5, HEADS, KEY_DIM + 1), "k must have shape"),
    ("v", (BATCH, 5, HEADS + 1, VALUE_DIM), "v must have shape"),
    ("g", (BATCH, 5, HEADS, KEY_DIM), "g must have shape"),
    ("g", (BATCH, 5, HEADS, VALUE_DIM, KEY_DIM), "g must have shape"),
    ("initial_state", (BATCH, HEADS, VALUE_DIM, KEY_DIM), "state must have shape"),
])
def test_bad_shapes_raise(name, shape, match):
  with pytest.raises(ValueError, match=match):
    kernels.diagonal_ssm(**_inputs(SSM, 5, seed=0) | {name: jnp.zeros(shape)})


def test_step_bad_shapes_raise():
  token = [_inputs(SSM, 1, seed=0)[n][:, 0] for n in NAMES]
  with pytest.raises(ValueError, match="state must have shape"):
    kernels.diagonal_ssm_step(*token, jnp.zeros((BATCH, HEADS, KEY_DIM)))
  with pytest.raises(ValueError, match="g must have shape"):
    kernels.diagonal_ssm_step(*token[:3], token[3][..., 0], jnp.zeros((BATCH, HEADS, KEY_DIM, VALUE_DIM)))
