"""titans (linear memory with momentum and forgetting): the chunked form and the decode step against the
token loop (naive), which all compute the exact token-level recurrence."""

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
                                               VALUE_DIM, Family, _assert_close, _fp32_matmuls,
                                               _hostile_gates, _inputs, _normal)

TITANS = Family(kernels.titans, kernels.titans_step, False, {"chunk_size": CHUNK})
NAMES = ("q", "k", "v", "theta", "g", "g_momentum")
STATE_SHAPE = (BATCH, HEADS, KEY_DIM, VALUE_DIM)


def _titans_inputs(seq_len: int, seed: int, with_state: bool = True) -> dict:
  """The gla tests' q, v and forget gate g, L2-normalised k, theta in (0, 1), a momentum log decay, and
  an optional (memory, momentum) initial state, fp32."""
  inputs = _inputs(TITANS, seq_len, seed, with_state=False)
  rng = np.random.default_rng(seed + 2000)
  gates = _normal(rng, (2, BATCH, seq_len, HEADS))
  state = (_normal(rng, STATE_SHAPE), 0.3 * _normal(rng, STATE_SHAPE)) if with_state else None
  return inputs | {"k": inputs["k"] / jnp.linalg.norm(inputs["k"], axis=-1, keepdims=True),
                   "theta": jax.nn.sigmoid(gates[0]), "g_momentum": jax.nn.log_sigmoid(gates[1]),
                   "initial_state": state}


def _cotangent(inputs: dict, seed: int) -> tuple:
  """Random cotangents for (o, (memory, momentum))."""
  rng = np.random.default_rng(seed + 1000)
  return _normal(rng, inputs["v"].shape), (_normal(rng, STATE_SHAPE), _normal(rng, STATE_SHAPE))


@functools.partial(jax.jit, static_argnames="impl")
def _forward(inputs: dict, impl: str) -> tuple[jax.Array, tuple]:
  return kernels.titans(**inputs, impl=impl, **TITANS.tiling)


_forward_and_vjp = functools.partial(op_vjp, _forward)
_assert_chunked_matches_naive = functools.partial(assert_matches_naive, _forward, impl="chunked",
                                                  cotangent_fn=_cotangent)


def _assert_states_close(state, expected, tol: float) -> None:
  for name, part, ref in zip(("memory", "momentum"), state, expected):
    assert part.dtype == jnp.float32
    _assert_close(part, ref, tol, name)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq_len,with_state", [(37, False), (77, True)])
def test_chunked_matches_naive(seq_len, with_state, seed):
  _assert_chunked_matches_naive(_titans_inputs(seq_len, seed, with_state), seed)


@pytest.mark.parametrize("pattern", ["zero", "scattered"])
def test_hostile_gates_finite_and_match_naive(pattern):
  """Extreme forget and momentum gates; learning rates of exactly 0 and 1 on 30% of the tokens each."""
  for seed in SEEDS[:2]:
    rng = np.random.default_rng(seed + 3000)
    theta = np.where(rng.random((BATCH, 77, HEADS)) < 0.6, rng.integers(0, 2, (BATCH, 77, HEADS)), 0.5)
    inputs = _titans_inputs(77, seed) | {"theta": jnp.asarray(theta, jnp.float32),
                                         "g": _hostile_gates(TITANS, pattern, 77, seed),
                                         "g_momentum": _hostile_gates(TITANS, pattern, 77, seed + 1)}
    _assert_chunked_matches_naive(inputs, seed)


def test_naive_matches_definition():
  """The token loop against the update as written (gradient step with momentum), in float64 NumPy."""
  inputs = _titans_inputs(5, seed=4)
  inputs["g"] = inputs["g"].at[:, 2].set(-jnp.inf)
  inputs["g_momentum"] = inputs["g_momentum"].at[:, 3].set(-jnp.inf)
  o, state = _forward(inputs, "naive")
  q, k, v, theta, g, g_momentum = (np.asarray(inputs[n], np.float64) for n in NAMES)
  memory, momentum = (np.asarray(s, np.float64) for s in inputs["initial_state"])
  o_ref = np.zeros(v.shape)
  for t in range(v.shape[1]):
    k_t, v_t = k[:, t, :, :, None], v[:, t, :, None, :]
    grad = k_t * (np.einsum("bhkv,bhk->bhv", memory, k[:, t])[:, :, None, :] - v_t)  # of |M^T k - v|^2 / 2
    momentum = np.exp(g_momentum[:, t, :, None, None]) * momentum - theta[:, t, :, None, None] * grad
    memory = np.exp(g[:, t, :, None, None]) * memory + momentum
    o_ref[:, t] = KEY_DIM**-0.5 * np.einsum("bhkv,bhk->bhv", memory, q[:, t])
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_states_close(state, (memory, momentum), FP32_TOL)


def test_without_momentum_or_forgetting_is_the_delta_rule():
  """eta = 0 and alpha = 0: M_t = (I - theta k k^T) M_{t-1} + theta k v^T, DeltaNet with beta = theta."""
  inputs = _titans_inputs(77, seed=7)
  memory, _ = inputs["initial_state"]
  o_ref, s_ref = kernels.delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["theta"],
                                    initial_state=memory, impl="naive")
  special = {"g": jnp.zeros_like(inputs["g"]), "g_momentum": jnp.full_like(inputs["g"], -jnp.inf)}
  (o, (m, _)), _ = _forward_and_vjp(inputs | special, _cotangent(inputs, 7), "chunked")  # compiled already
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(m, s_ref, FP32_TOL, "memory")


def _token(inputs: dict, t: int) -> tuple[jax.Array, ...]:
  return tuple(inputs[n][:, t] for n in NAMES)


def test_step_loop_matches_naive():
  inputs = _titans_inputs(77, seed=3)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 3), "naive")
  assert_step_loop_matches(TITANS.step, _token, inputs, o_ref, s_ref, 77)


def test_single_token_chunked_is_one_step():
  inputs = _titans_inputs(1, seed=6)
  o, state = _forward(inputs, "chunked")
  o_ref, state_ref = jax.jit(TITANS.step)(*_token(inputs, 0), inputs["initial_state"])
  _assert_close(o[:, 0], o_ref, FP32_TOL, "o")
  _assert_states_close(state, state_ref, FP32_TOL)


def test_bf16_inputs():
  inputs = _titans_inputs(77, seed=5)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 5), "naive")
  o, s = _forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), inputs), "chunked")
  assert o.dtype == jnp.bfloat16
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_states_close(s, s_ref, BF16_TOL)


def _replace(name: str, value):
  return lambda x: x | {name: value}


@pytest.mark.parametrize("bad,match", [
    (_replace("k", jnp.zeros((BATCH, 5, HEADS, KEY_DIM + 1))), "k must have shape"),
    (_replace("v", jnp.zeros((BATCH, 6, HEADS, VALUE_DIM))), "v must have shape"),
    (_replace("theta", jnp.zeros((BATCH, 5, HEADS, 1))), "theta must have shape"),
    (_replace("g", jnp.zeros((BATCH, 5))), "g must have shape"),
    (_replace("g_momentum", jnp.zeros((BATCH, 5, HEADS, KEY_DIM))), "g_momentum must have shape"),
    (_replace("initial_state", (jnp.zeros(STATE_SHAPE),)), "state must be a pair"),
    (_replace("initial_state", (jnp.zeros(STATE_SHAPE), jnp.zeros(STATE_SHAPE[:3]))),
     "state must have shape"),
])
def test_bad_shapes_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    kernels.titans(**bad(_titans_inputs(5, seed=0)), **TITANS.tiling)


def test_bad_impl_and_chunk_size_raise():
  inputs = _titans_inputs(5, seed=0)
  with pytest.raises(ValueError, match="'naive', 'chunked', 'auto'"):
    kernels.titans(**inputs, impl="fast")
  with pytest.raises(ValueError, match="chunk_size must be positive"):
    kernels.titans(**inputs, chunk_size=0)
