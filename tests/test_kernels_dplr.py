"""dplr (RWKV7's generalized delta rule): the chunked form and the decode step against the token loop."""

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
                                               SUB_CHUNK, VALUE_DIM, Family, _assert_close, _cotangent,
                                               _fp32_matmuls, _hostile_gates, _inputs)

DPLR = Family(kernels.dplr, kernels.dplr_step, True, {"chunk_size": CHUNK, "sub_chunk_size": SUB_CHUNK})
NAMES = ("q", "k", "v", "a", "b", "g")


def _dplr_inputs(seq_len: int, seed: int, with_state: bool = True, rwkv: bool = True) -> dict:
  """The gla tests' q, k, v, per-key g and initial state, plus a, b: RWKV7's a = -kappa_hat,
  b = kappa_hat * iclr (kappa_hat the L2-normalised k, iclr in (0, 1)), or small generic vectors."""
  inputs = _inputs(DPLR, seq_len, seed, with_state)
  rng = np.random.default_rng(seed + 2000)
  shape = inputs["q"].shape
  if rwkv:
    kappa = inputs["k"] / jnp.linalg.norm(inputs["k"], axis=-1, keepdims=True)
    iclr = jax.nn.sigmoid(jnp.asarray(rng.standard_normal(shape), jnp.float32))
    return inputs | {"a": -kappa, "b": kappa * iclr}
  a, b = (jnp.asarray(0.2 * rng.standard_normal(shape), jnp.float32) for _ in range(2))
  return inputs | {"a": a, "b": b}


@functools.partial(jax.jit, static_argnames="impl")
def _forward(inputs: dict, impl: str) -> tuple[jax.Array, jax.Array]:
  return kernels.dplr(**inputs, impl=impl, **DPLR.tiling)


_forward_and_vjp = functools.partial(op_vjp, _forward)
_assert_chunked_matches_naive = functools.partial(assert_matches_naive, _forward, impl="chunked")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq_len,with_state,rwkv", [(37, False, True), (77, True, True), (77, True, False)])
def test_chunked_matches_naive(seq_len, with_state, rwkv, seed):
  _assert_chunked_matches_naive(_dplr_inputs(seq_len, seed, with_state, rwkv), seed)


@pytest.mark.parametrize("pattern", ["zero", "scattered", "per_channel"])
def test_hostile_gates_finite_and_match_naive(pattern):
  """Extreme decays, and in-context learning rates of exactly 0 and 1 on a third of the tokens each."""
  for seed in SEEDS[:2]:
    inputs = _dplr_inputs(77, seed)
    rng = np.random.default_rng(seed + 3000)
    iclr = jnp.asarray(rng.choice([0.0, 1.0, 0.5], size=(BATCH, 77, HEADS, 1)), jnp.float32)
    inputs |= {"b": -inputs["a"] * iclr, "g": _hostile_gates(DPLR, pattern, 77, seed)}
    _assert_chunked_matches_naive(inputs, seed)


def test_naive_matches_definition():
  """The token loop against the update as written, in float64 NumPy, with a -inf gate."""
  inputs = _dplr_inputs(5, seed=4, rwkv=False)
  inputs["g"] = inputs["g"].at[:, 2, :, :3].set(-jnp.inf)
  o, state = _forward(inputs, "naive")
  q, k, v, a, b, g, s = (np.asarray(inputs[n], np.float64) for n in (*NAMES, "initial_state"))
  o_ref = np.zeros(v.shape)
  for t in range(v.shape[1]):
    transition = (np.exp(g[:, t])[..., None] * np.eye(KEY_DIM)
                  + b[:, t, :, :, None] * a[:, t, :, None, :])  # [B, H, K, K]
    s = transition @ s + k[:, t, :, :, None] * v[:, t, :, None, :]
    o_ref[:, t] = KEY_DIM**-0.5 * np.einsum("bhkv,bhk->bhv", s, q[:, t])
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(state, s, FP32_TOL, "final_state")


def test_gated_delta_rule_is_a_special_case():
  """a = e^g k, b = -beta k, k' = beta k gives (I - beta k k^T)(e^g S) + beta k v^T."""
  rng = np.random.default_rng(7)
  inputs = _dplr_inputs(77, seed=7)
  kappa, g = -inputs["a"], inputs["g"][..., 0]  # L2-normalised keys and a scalar gate per head
  beta = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((BATCH, 77, HEADS)), jnp.float32))
  o_ref, s_ref = kernels.delta_rule(inputs["q"], kappa, inputs["v"], beta, g,
                                    initial_state=inputs["initial_state"], impl="naive")
  special = {"k": beta[..., None] * kappa, "a": jnp.exp(g)[..., None] * kappa, "b": -beta[..., None] * kappa,
             "g": jnp.broadcast_to(g[..., None], kappa.shape)}
  (o, s), _ = _forward_and_vjp(inputs | special, _cotangent(inputs, 7), "chunked")  # compiled already
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(s, s_ref, FP32_TOL, "final_state")


def _token(inputs: dict, t: int) -> tuple[jax.Array, ...]:
  return tuple(inputs[n][:, t] for n in NAMES)


def test_step_loop_matches_naive():
  inputs = _dplr_inputs(77, seed=3)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 3), "naive")
  assert_step_loop_matches(DPLR.step, _token, inputs, o_ref, s_ref, 77)


def test_single_token_chunked_is_one_step():
  inputs = _dplr_inputs(1, seed=6)
  o, state = _forward(inputs, "chunked")
  o_ref, state_ref = jax.jit(DPLR.step)(*_token(inputs, 0), inputs["initial_state"])
  _assert_close(o[:, 0], o_ref, FP32_TOL, "o")
  _assert_close(state, state_ref, FP32_TOL, "state")


def test_bf16_inputs():
  inputs = _dplr_inputs(77, seed=5)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 5), "naive")
  o, s = _forward({n: x.astype(jnp.bfloat16) for n, x in inputs.items()}, "chunked")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_close(s, s_ref, BF16_TOL, "final_state")


def _replace(name: str, shape: tuple[int, ...]):
  return lambda x: x | {name: jnp.zeros(shape)}


@pytest.mark.parametrize("bad,match", [
    (_replace("k", (BATCH, 5, HEADS, KEY_DIM + 1)), "k must have shape"),
    (_replace("v", (BATCH, 6, HEADS, VALUE_DIM)), "v must have shape"),
    (_replace("a", (BATCH, 5, HEADS, VALUE_DIM)), "a must have shape"),
    (_replace("b", (BATCH, 5, HEADS)), "b must have shape"),
    (_replace("g", (BATCH, 5, HEADS)), "g must have shape"),
    (_replace("initial_state", (BATCH, HEADS, VALUE_DIM, KEY_DIM)), "state must have shape"),
])
def test_bad_shapes_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    kernels.dplr(**bad(_dplr_inputs(5, seed=0)), **DPLR.tiling)


def test_bad_impl_and_tiling_raise():
  inputs = _dplr_inputs(5, seed=0)
  with pytest.raises(ValueError, match="'naive', 'chunked', 'auto'"):
    kernels.dplr(**inputs, impl="fast")
  with pytest.raises(ValueError, match="sub_chunk_size"):
    kernels.dplr(**inputs, chunk_size=16, sub_chunk_size=6)
  with pytest.raises(ValueError, match="state must have shape"):
    DPLR.step(*_token(inputs, 0), inputs["initial_state"][..., 0])
