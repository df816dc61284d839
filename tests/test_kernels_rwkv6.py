"""gla_bonus (RWKV6): the chunked form (GLA's, on shifted queries) and the decode step against the token
loop (naive)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
# The gla tests' sizes, tolerances, input generators and checks; `_fp32_matmuls` is their autouse fixture
# (true fp32 matmuls), imported to apply here too.
from tests.test_kernels_simple_gla_gla import (assert_matches_naive, op_vjp, BATCH, BF16_TOL, CHUNK,
                                               FP32_TOL, HEADS, KEY_DIM, SEEDS, SUB_CHUNK, VALUE_DIM,
                                               Family, _assert_close, _fp32_matmuls, _hostile_gates,
                                               _inputs)

BONUS = Family(kernels.gla_bonus, kernels.gla_bonus_step, True,
               {"chunk_size": CHUNK, "sub_chunk_size": SUB_CHUNK})
NAMES = ("q", "k", "v", "g")


def _bonus_inputs(seq_len: int, seed: int, with_state: bool = True) -> dict:
  """The gla tests' q, k, v, per-key g and initial state, and a bonus u [heads, key_dim], fp32."""
  rng = np.random.default_rng(seed + 3000)
  u = jnp.asarray(rng.standard_normal((HEADS, KEY_DIM)), jnp.float32)
  return _inputs(BONUS, seq_len, seed, with_state) | {"u": u}


@functools.partial(jax.jit, static_argnames="impl")
def _forward(inputs: dict, impl: str) -> tuple[jax.Array, jax.Array]:
  return kernels.gla_bonus(**inputs, impl=impl, **BONUS.tiling)


_forward_and_vjp = functools.partial(op_vjp, _forward)
_assert_chunked_matches_naive = functools.partial(assert_matches_naive, _forward, impl="chunked")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq_len,with_state", [(37, False), (77, True)])
def test_chunked_matches_naive(seq_len, with_state, seed):
  _assert_chunked_matches_naive(_bonus_inputs(seq_len, seed, with_state), seed)


def test_naive_matches_definition():
  """The token loop against RWKV6's update as written (the output reads the state before the token), in
  float64 NumPy, with a -inf decay."""
  inputs = _bonus_inputs(5, seed=4)
  inputs["g"] = inputs["g"].at[:, 2].set(-jnp.inf)
  o, state = _forward(inputs, "naive")
  q, k, v, g, u, s = (np.asarray(inputs[n], np.float64) for n in (*NAMES, "u", "initial_state"))
  o_ref = np.zeros(v.shape)
  for t in range(v.shape[1]):
    kv = k[:, t, :, :, None] * v[:, t, :, None, :]
    o_ref[:, t] = KEY_DIM**-0.5 * np.einsum("bhkv,bhk->bhv", s + u[:, :, None] * kv, q[:, t])
    s = np.exp(g[:, t])[..., None] * s + kv
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(state, s, FP32_TOL, "state")


def test_per_token_bonus_matches_shared_bonus():
  inputs = _bonus_inputs(5, seed=8)
  per_token = inputs | {"u": jnp.broadcast_to(inputs["u"], inputs["q"].shape)}
  for impl in ("naive", "chunked"):
    o_ref, s_ref = _forward(inputs, impl)
    o, s = _forward(per_token, impl)
    _assert_close(o, o_ref, FP32_TOL, f"{impl} o")
    _assert_close(s, s_ref, FP32_TOL, f"{impl} final_state")


def test_step_loop_matches_naive():
  inputs = _bonus_inputs(77, seed=3)
  o_ref, s_ref = _forward(inputs, "naive")
  step = jax.jit(kernels.gla_bonus_step)
  state, outputs = inputs["initial_state"], []
  for t in range(77):
    o_t, state = step(*(inputs[n][:, t] for n in NAMES), inputs["u"], state)
    outputs.append(o_t)
  assert state.dtype == jnp.float32
  _assert_close(jnp.stack(outputs, axis=1), o_ref, FP32_TOL, "o")
  _assert_close(state, s_ref, FP32_TOL, "state")


def test_single_token_chunked_is_one_step():
  inputs = _bonus_inputs(1, seed=6)
  o, state = _forward(inputs, "chunked")
  o_ref, state_ref = kernels.gla_bonus_step(*(inputs[n][:, 0] for n in NAMES), inputs["u"],
                                            inputs["initial_state"])
  _assert_close(o[:, 0], o_ref, FP32_TOL, "o")
  _assert_close(state, state_ref, FP32_TOL, "state")


@pytest.mark.parametrize("pattern", ["zero", "scattered", "per_channel"])
def test_hostile_gates_finite_and_match_naive(pattern):
  for seed in SEEDS[:2]:
    inputs = _bonus_inputs(77, seed) | {"g": _hostile_gates(BONUS, pattern, 77, seed)}
    _assert_chunked_matches_naive(inputs, seed)


def test_bf16_inputs():
  inputs = _bonus_inputs(77, seed=5)
  o_ref, s_ref = _forward(inputs, "naive")
  o, s = _forward({n: x.astype(jnp.bfloat16) for n, x in inputs.items()}, "chunked")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_close(s, s_ref, BF16_TOL, "final_state")


def test_unknown_impl_raises():
  with pytest.raises(ValueError, match="'naive', 'chunked', 'auto'"):
    kernels.gla_bonus(**_bonus_inputs(5, seed=0), impl="fast")


@pytest.mark.parametrize("name,shape,match", [
    ("k", (BATCH, 5, HEADS, KEY_DIM + 1), "k must have shape"),
    ("g", (BATCH, 5, HEADS), "g must have shape"),
    ("u", (HEADS, VALUE_DIM), "u must have shape"),
    ("u", (BATCH, HEADS, KEY_DIM), "u must have shape"),
    ("initial_state", (BATCH, HEADS, VALUE_DIM, KEY_DIM), "state must have shape"),
])
def test_bad_shapes_raise(name, shape, match):
  with pytest.raises(ValueError, match=match):
    kernels.gla_bonus(**_bonus_inputs(5, seed=0) | {name: jnp.zeros(shape)}, **BONUS.tiling)


def test_step_bad_shapes_raise():
  inputs = _bonus_inputs(1, seed=0)
  token = [inputs[n][:, 0] for n in NAMES]
  with pytest.raises(ValueError, match="state must have shape"):
    kernels.gla_bonus_step(*token, inputs["u"], jnp.zeros((BATCH, HEADS, KEY_DIM)))
  with pytest.raises(ValueError, match="u must have shape"):
    kernels.gla_bonus_step(*token, inputs["u"][0], inputs["initial_state"])
