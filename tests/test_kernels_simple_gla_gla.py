"""simple_gla and gla: the chunked form and the decode step against the token loop (naive)."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels

BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 2, 16, 8
CHUNK, SUB_CHUNK = 16, 8
SEEDS = (0, 1, 2)
# Largest allowed |actual - expected|, relative to 1 + max |expected|.
FP32_TOL = 1e-4
BF16_TOL = 3e-2
HOSTILE_LOG_DECAYS = (-30.0, -1e4, -np.inf)
WEAK_LOG_DECAY = -0.01


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  """True fp32 matmuls on every backend (GPUs default to TF32), so that the tolerances mean the same there."""
  with jax.default_matmul_precision("highest"):
    yield


@dataclasses.dataclass(frozen=True)
class Family:
  """A recurrence family under test: its op, decode step, decay layout and chunk sizes."""
  op: Callable
  step: Callable
  per_key_decay: bool
  tiling: dict

  def decay_shape(self, seq_len: int) -> tuple[int, ...]:
    lead = (BATCH, seq_len, HEADS)
    return (*lead, KEY_DIM) if self.per_key_decay else lead


FAMILIES = {
    "simple_gla": Family(kernels.simple_gla, kernels.simple_gla_step, False, {"chunk_size": CHUNK}),
    "gla": Family(kernels.gla, kernels.gla_step, True, {"chunk_size": CHUNK, "sub_chunk_size": SUB_CHUNK}),
}


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _inputs(family: Family, seq_len: int, seed: int, with_state: bool = True) -> dict:
  """q, k, v, a moderate random log decay g, and an optional initial state, all fp32.

  NumPy draws the data: eager jax.random would compile once per shape, which costs more than the tests.
  """
  rng = np.random.default_rng(seed)
  qk_shape = (BATCH, seq_len, HEADS, KEY_DIM)
  return {
      "q": _normal(rng, qk_shape),
      "k": _normal(rng, qk_shape),
      "v": _normal(rng, (BATCH, seq_len, HEADS, VALUE_DIM)),
      "g": jax.nn.log_sigmoid(2.0 + _normal(rng, family.decay_shape(seq_len))),
      "initial_state": _normal(rng, (BATCH, HEADS, KEY_DIM, VALUE_DIM)) if with_state else None,
  }


@functools.partial(jax.jit, static_argnames=("family", "impl"))
def _forward(inputs: dict, family: str, impl: str) -> tuple[jax.Array, jax.Array]:
  """(o, final_state) of the family's op with the given impl."""
  fam = FAMILIES[family]
  return fam.op(**inputs, impl=impl, **fam.tiling)


@functools.partial(jax.jit, static_argnames=("family", "impl"))
def _forward_and_vjp(inputs: dict, cotangent: tuple, family: str, impl: str) -> tuple[tuple, dict]:
  """(o, final_state) and the gradients of every input under the given cotangent."""
  outputs, vjp = jax.vjp(lambda x: _forward(x, family, impl), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


# One forward per family, fixed objects so that `op_vjp` compiles each once.
_FORWARDS = {name: functools.partial(_forward, family=name) for name in FAMILIES}


def _cotangent(inputs: dict, seed: int) -> tuple[jax.Array, jax.Array]:
  """Random cotangents for (o, final_state)."""
  rng = np.random.default_rng(seed + 1000)
  return _normal(rng, inputs["v"].shape), _normal(rng, (BATCH, HEADS, KEY_DIM, VALUE_DIM))


def _max_abs_diff(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def _assert_close(actual, expected, tol: float, name: str) -> None:
  """|actual - expected| <= tol * (1 + max |expected|), everywhere; both finite."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  assert np.all(np.isfinite(expected)), f"{name}: non-finite reference values"
  bound = tol * (1.0 + np.max(np.abs(expected)))
  err = _max_abs_diff(actual, expected)
  assert err <= bound, f"{name}: max abs diff {err:.3g} > {bound:.3g}"


def op_vjp(forward: Callable, inputs: dict, cotangent, impl: str) -> tuple[tuple, dict]:
  """(o, final_state) of `forward(inputs, impl)` and the gradients of every input under `cotangent`."""
  outputs, vjp = jax.vjp(lambda x: forward(x, impl=impl), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


op_vjp = functools.partial(jax.jit, static_argnames=("forward", "impl"))(op_vjp)


def assert_step_loop_matches(step: Callable, token: Callable, inputs: dict, o_ref, s_ref,
                             seq_len: int) -> None:
  """A jitted loop of `step(*token(inputs, t), state)` gives naive's outputs and final state (fp32)."""
  step = jax.jit(step)
  state, outputs = inputs["initial_state"], []
  for t in range(seq_len):
    o_t, state = step(*token(inputs, t), state)
    outputs.append(o_t)
  _assert_close(jnp.stack(outputs, axis=1), o_ref, FP32_TOL, "o")
  for i, (part, expected) in enumerate(zip(jax.tree.leaves(state), jax.tree.leaves(s_ref))):
    assert part.dtype == jnp.float32
    _assert_close(part, expected, FP32_TOL, f"state[{i}]")


def assert_matches_naive(forward: Callable, inputs: dict, seed: int, impl: str = "chunked",
                         cotangent_fn: Callable | None = None) -> None:
  """Outputs, every final-state array and all gradients of `impl` equal naive's (fp32)."""
  cotangent = (cotangent_fn or _cotangent)(inputs, seed)
  (o_ref, s_ref), g_ref = op_vjp(forward, inputs, cotangent, "naive")
  (o, s), grads = op_vjp(forward, inputs, cotangent, impl)
  assert o.dtype == jnp.float32
  _assert_close(o, o_ref, FP32_TOL, "o")
  for i, (state, expected) in enumerate(zip(jax.tree.leaves(s), jax.tree.leaves(s_ref))):
    assert state.dtype == jnp.float32
    _assert_close(state, expected, FP32_TOL, f"final_state[{i}]")
  for name, grad in grads.items():
    if inputs[name] is not None:
      _assert_close(grad, g_ref[name], FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq_len,with_state", [(37, False), (77, True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_matches_naive(family, seq_len, with_state, seed):
  inputs = _inputs(FAMILIES[family], seq_len, seed, with_state)
  assert_matches_naive(_FORWARDS[family], inputs, seed)


def _token(inputs: dict, t: int) -> tuple[jax.Array, ...]:
  """q_t, k_t, v_t, g_t of token t."""
  return tuple(inputs[n][:, t] for n in ("q", "k", "v", "g"))


@pytest.mark.parametrize("family", FAMILIES)
def test_step_loop_matches_naive(family):
  fam = FAMILIES[family]
  inputs = _inputs(fam, 77, seed=3)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 3), family, "naive")
  assert_step_loop_matches(fam.step, _token, inputs, o_ref, s_ref, 77)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_token_chunked_is_one_step(family):
  fam = FAMILIES[family]
  inputs = _inputs(fam, 1, seed=6)
  o, state = _forward(inputs, family, "chunked")
  o_ref, state_ref = jax.jit(fam.step)(*_token(inputs, 0), inputs["initial_state"])
  _assert_close(o[:, 0], o_ref, FP32_TOL, "o")
  _assert_close(state, state_ref, FP32_TOL, "state")


def _hostile_gates(family: Family, pattern: str, seq_len: int, seed: int) -> jax.Array:
  """Log decays with the extremes seen in training.

  "zero": no decay anywhere. "scattered": weak decay, with -30, -1e4 or -inf (all channels) on a fifth of the
  tokens, chunk and sub-chunk edges included. "per_channel": every channel drawn from 0, weak, -30, -1e4, -inf.
  """
  rng = np.random.default_rng(seed)
  shape = family.decay_shape(seq_len)
  if pattern == "zero":
    return jnp.zeros(shape)
  if pattern == "per_channel":
    return jnp.asarray(rng.choice([0.0, WEAK_LOG_DECAY, *HOSTILE_LOG_DECAYS], size=shape,
                                  p=[0.3, 0.4, 0.1, 0.1, 0.1]), jnp.float32)
  g = np.full(shape, WEAK_LOG_DECAY, np.float32)
  edges = [0, CHUNK - 1, CHUNK, CHUNK + SUB_CHUNK]
  tokens = np.concatenate([edges, rng.choice(seq_len, size=seq_len // 5, replace=False)])
  hostile = rng.choice(HOSTILE_LOG_DECAYS, size=len(tokens))
  g[:, tokens] = hostile.reshape(-1, *[1] * (g.ndim - 2))  # every head (and channel) of the token
  return jnp.asarray(g)


@pytest.mark.parametrize("family,pattern", [
    ("simple_gla", "zero"), ("simple_gla", "scattered"),
    ("gla", "zero"), ("gla", "scattered"), ("gla", "per_channel"),
])
def test_hostile_gates_finite_and_match_naive(family, pattern):
  fam = FAMILIES[family]
  for seed in SEEDS[:2]:
    inputs = _inputs(fam, 77, seed) | {"g": _hostile_gates(fam, pattern, 77, seed)}
    assert_matches_naive(_FORWARDS[family], inputs, seed)


def test_simple_gla_without_gate_is_zero_gate():
  fam = FAMILIES["simple_gla"]
  inputs = _inputs(fam, 5, seed=4)
  o_ref, s_ref = kernels.simple_gla(**inputs | {"g": jnp.zeros(fam.decay_shape(5))}, impl="naive")
  o, s = kernels.simple_gla(**inputs | {"g": None}, impl="naive")
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(s, s_ref, FP32_TOL, "final_state")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_inputs(family):
  inputs = _inputs(FAMILIES[family], 77, seed=5)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 5), family, "naive")
  bf16_inputs = {n: x.astype(jnp.bfloat16) for n, x in inputs.items()}
  o, s = _forward(bf16_inputs, family, "chunked")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_close(s, s_ref, BF16_TOL, "final_state")


def test_unknown_impl_raises():
  inputs = _inputs(FAMILIES["gla"], 5, seed=0)
  with pytest.raises(ValueError, match="'naive', 'chunked', 'pallas', 'auto'"):
    kernels.gla(**inputs, impl="fast")


def _replace(name: str, shape: tuple[int, ...]):
  return lambda x: x | {name: jnp.zeros(shape)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad,match", [
    (_replace("k", (BATCH, 5, HEADS, KEY_DIM + 1)), "k must have shape"),
    (_replace("v", (BATCH, 6, HEADS, VALUE_DIM)), "v must have shape"),
    (_replace("v", (BATCH, 5, HEADS + 1, VALUE_DIM)), "v must have shape"),
    (_replace("q", (BATCH, 5, KEY_DIM)), "q must have shape"),
    (_replace("g", (BATCH, 5, HEADS, 3)), "g must have shape"),
    (_replace("initial_state", (BATCH, HEADS, VALUE_DIM, KEY_DIM)), "state must have shape"),
])
def test_bad_shapes_raise(family, bad, match):
  fam = FAMILIES[family]
  with pytest.raises(ValueError, match=match):
    fam.op(**bad(_inputs(fam, 5, seed=0)), **fam.tiling)


def test_bad_gate_and_tiling_raise():
  inputs = _inputs(FAMILIES["gla"], 5, seed=0)
  with pytest.raises(ValueError, match="g must have shape"):
    kernels.gla(**inputs | {"g": None})
  with pytest.raises(ValueError, match="g must have shape"):
    kernels.simple_gla(**inputs)  # a per-key gate given to the scalar family
  with pytest.raises(ValueError, match="sub_chunk_size"):
    kernels.gla(**inputs, chunk_size=16, sub_chunk_size=6)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_bad_state_raises(family):
  fam = FAMILIES[family]
  token = {n: x[:, 0] for n, x in _inputs(fam, 1, seed=0).items() if n != "initial_state"}
  with pytest.raises(ValueError, match="state must have shape"):
    fam.step(*token.values(), jnp.zeros((BATCH, HEADS, KEY_DIM)))
