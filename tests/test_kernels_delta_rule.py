"""delta_rule: the chunked (WY) form and the decode step against the token loop (naive)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
# The gla tests' sizes, tolerances, input generators and checks; `_fp32_matmuls` is their autouse fixture
# (true fp32 matmuls), imported to apply here too.
from tests.test_kernels_simple_gla_gla import (assert_matches_naive, assert_step_loop_matches, op_vjp,
                                               BATCH, BF16_TOL, CHUNK, FP32_TOL, HEADS, KEY_DIM, SEEDS,
                                               VALUE_DIM, Family, _assert_close, _cotangent,
                                               _fp32_matmuls, _hostile_gates, _inputs)

# A scalar gate per head and token, as simple GLA: the gla tests' input and gate generators apply.
DELTA = Family(kernels.delta_rule, kernels.delta_rule_step, per_key_decay=False, tiling={"chunk_size": CHUNK})
BETA_PATTERNS = ("zero", "one", "mixed")
GATE_PATTERNS = ("zero", "scattered")


def _delta_inputs(seq_len: int, seed: int, with_state: bool = True, with_gate: bool = True) -> dict:
  """The gla tests' q, v, g and initial state, L2-normalised k (as DeltaNet) and beta in (0, 1), fp32."""
  inputs = _inputs(DELTA, seq_len, seed, with_state)
  k = inputs["k"] / jnp.linalg.norm(inputs["k"], axis=-1, keepdims=True)
  rng = np.random.default_rng(seed + 2000)
  beta = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((BATCH, seq_len, HEADS)), jnp.float32))
  return inputs | {"k": k, "beta": beta, "g": inputs["g"] if with_gate else None}


@functools.partial(jax.jit, static_argnames="impl")
def _forward(inputs: dict, impl: str) -> tuple[jax.Array, jax.Array]:
  """(o, final_state) of delta_rule with the given impl."""
  return kernels.delta_rule(**inputs, impl=impl, **DELTA.tiling)


_forward_and_vjp = functools.partial(op_vjp, _forward)
_assert_chunked_matches_naive = functools.partial(assert_matches_naive, _forward, impl="chunked")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq_len,with_state,with_gate", [
    (37, False, True), (77, True, True), (77, True, False), (37, False, False),
])
def test_chunked_matches_naive(seq_len, with_state, with_gate, seed):
  _assert_chunked_matches_naive(_delta_inputs(seq_len, seed, with_state, with_gate), seed)


def test_naive_matches_definition():
  """The token loop against the update as written, in float64 NumPy, with a -inf gate and beta 0 and 1."""
  inputs = _delta_inputs(5, seed=4)
  inputs["g"] = inputs["g"].at[:, 2].set(-jnp.inf)
  inputs["beta"] = inputs["beta"].at[:, 1].set(0.0).at[:, 3].set(1.0)
  o, state = _forward(inputs, "naive")
  names = ("q", "k", "v", "beta", "g", "initial_state")
  q, k, v, beta, g, s = (np.asarray(inputs[n], np.float64) for n in names)
  o_ref = np.zeros(v.shape)
  for t in range(v.shape[1]):
    erase = np.eye(KEY_DIM) - beta[:, t, :, None, None] * k[:, t, :, :, None] * k[:, t, :, None, :]
    s = erase @ (np.exp(g[:, t, :, None, None]) * s) + beta[:, t, :, None, None] * (
        k[:, t, :, :, None] * v[:, t, :, None, :])
    o_ref[:, t] = KEY_DIM**-0.5 * np.einsum("bhkv,bhk->bhv", s, q[:, t])
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(state, s, FP32_TOL, "final_state")


def test_without_gate_is_zero_gate():
  inputs = _delta_inputs(5, seed=4)
  o_ref, s_ref = _forward(inputs | {"g": jnp.zeros((BATCH, 5, HEADS))}, "naive")
  o, s = _forward(inputs | {"g": None}, "naive")
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(s, s_ref, FP32_TOL, "final_state")


def _token(inputs: dict, t: int) -> tuple[jax.Array | None, ...]:
  """q_t, k_t, v_t, beta_t, g_t of token t (g_t None without a gate)."""
  return tuple(None if inputs[n] is None else inputs[n][:, t] for n in ("q", "k", "v", "beta", "g"))


@pytest.mark.parametrize("with_gate", [True, False])
def test_step_loop_matches_naive(with_gate):
  inputs = _delta_inputs(77, seed=3, with_gate=with_gate)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 3), "naive")
  assert_step_loop_matches(DELTA.step, _token, inputs, o_ref, s_ref, 77)


def test_single_token_chunked_is_one_step():
  inputs = _delta_inputs(1, seed=6)
  o, state = _forward(inputs, "chunked")
  o_ref, state_ref = jax.jit(DELTA.step)(*_token(inputs, 0), inputs["initial_state"])
  _assert_close(o[:, 0], o_ref, FP32_TOL, "o")
  _assert_close(state, state_ref, FP32_TOL, "state")


def _hostile_beta(pattern: str, seq_len: int, seed: int) -> jax.Array:
  """Write strengths at the ends of [0, 1]: all 0 (no writes), all 1 (full overwrite along k), or each
  token drawn from 0, 1 and uniform."""
  shape = (BATCH, seq_len, HEADS)
  if pattern != "mixed":
    return jnp.full(shape, float(pattern == "one"), jnp.float32)
  rng = np.random.default_rng(seed + 3000)
  mixed = np.where(rng.random(shape) < 0.5, rng.integers(0, 2, shape), rng.random(shape))
  return jnp.asarray(mixed, jnp.float32)


@pytest.mark.parametrize("gate", GATE_PATTERNS)
@pytest.mark.parametrize("beta", BETA_PATTERNS)
def test_hostile_beta_and_gates_finite_and_match_naive(beta, gate):
  for seed in SEEDS[:2]:
    inputs = _delta_inputs(77, seed) | {"beta": _hostile_beta(beta, 77, seed),
                                        "g": _hostile_gates(DELTA, gate, 77, seed)}
    _assert_chunked_matches_naive(inputs, seed)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_bf16_inputs(impl):
  inputs = _delta_inputs(77, seed=5)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 5), "naive")
  o, s = _forward({n: x.astype(jnp.bfloat16) for n, x in inputs.items()}, impl)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_close(s, s_ref, BF16_TOL, "final_state")


def test_unknown_impl_raises():
  with pytest.raises(ValueError, match="'naive', 'chunked', 'pallas', 'auto'"):
    kernels.delta_rule(**_delta_inputs(5, seed=0), impl="fast")


def _replace(name: str, shape: tuple[int, ...]):
  return lambda x: x | {name: jnp.zeros(shape)}


@pytest.mark.parametrize("bad,match", [
    (_replace("k", (BATCH, 5, HEADS, KEY_DIM + 1)), "k must have shape"),
    (_replace("v", (BATCH, 6, HEADS, VALUE_DIM)), "v must have shape"),
    (_replace("q", (BATCH, 5, KEY_DIM)), "q must have shape"),
    (_replace("beta", (BATCH, 5, HEADS, 1)), "beta must have shape"),
    (_replace("beta", (BATCH, 5)), "beta must have shape"),
    (_replace("g", (BATCH, 5, HEADS, KEY_DIM)), "g must have shape"),
    (_replace("initial_state", (BATCH, HEADS, VALUE_DIM, KEY_DIM)), "state must have shape"),
])
def test_bad_shapes_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    kernels.delta_rule(**bad(_delta_inputs(5, seed=0)), **DELTA.tiling)


def test_bad_chunk_size_raises():
  with pytest.raises(ValueError, match="chunk_size must be positive"):
    kernels.delta_rule(**_delta_inputs(5, seed=0), chunk_size=0)


def test_step_bad_shapes_raise():
  q_t, k_t, v_t, beta_t, g_t = _token(_delta_inputs(1, seed=0), 0)
  state = jnp.zeros((BATCH, HEADS, KEY_DIM, VALUE_DIM))
  with pytest.raises(ValueError, match="state must have shape"):
    DELTA.step(q_t, k_t, v_t, beta_t, g_t, state[..., 0])
  with pytest.raises(ValueError, match="beta must have shape"):
    DELTA.step(q_t, k_t, v_t, beta_t[:, :1], g_t, state)
