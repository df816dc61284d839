"""impl="pallas" of simple_gla and gla against the token loop (naive), in Pallas interpret mode on the CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.kernels import segments
from linmoe.kernels.pallas import intra, recurrence, state

# (batch, heads, key_dim, value_dim): small, and one with two key and two value blocks in the program grids.
SMALL, BLOCKED = (2, 2, 32, 16), (1, 1, 128, 128)
SEQ_LEN = 37
TILING = {"simple_gla": {"chunk_size": 16}, "gla": {"chunk_size": 32, "sub_chunk_size": 16}}
OPS = {"simple_gla": kernels.simple_gla, "gla": kernels.gla}
# Largest allowed |actual - expected|, relative to 1 + max |expected|.
FP32_TOL = 1e-4
BF16_TOL = 3e-2
HOSTILE_LOG_DECAYS = (-30.0, -1e4, -np.inf)


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  """True fp32 matmuls on every backend, so that the tolerances mean the same everywhere."""
  with jax.default_matmul_precision("highest"):
    yield


def _inputs(family: str, dims: tuple[int, int, int, int], seed: int, with_state: bool = True) -> dict:
  """fp32 q, k, v, a moderate random log decay g and an optional initial state (NumPy draws them)."""
  batch, heads, key_dim, value_dim = dims
  rng = np.random.default_rng(seed)
  lead = (batch, SEQ_LEN, heads)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  return {
      "q": normal((*lead, key_dim)),
      "k": normal((*lead, key_dim)),
      "v": normal((*lead, value_dim)),
      "g": jax.nn.log_sigmoid(2.0 + normal((*lead, key_dim) if family == "gla" else lead)),
      "initial_state": normal((batch, heads, key_dim, value_dim)) if with_state else None,
  }


@functools.partial(jax.jit, static_argnames=("family", "impl"))
def _forward_and_vjp(inputs: dict, cotangent: tuple, family: str, impl: str) -> tuple[tuple, dict]:
  """(o, final_state) of the op and the gradients of every input under the given cotangent."""
  outputs, vjp = jax.vjp(lambda x: OPS[family](**x, impl=impl, **TILING[family]), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


def _cotangent(inputs: dict, seed: int) -> tuple[jax.Array, jax.Array]:
  """Random fp32 cotangents for (o, final_state)."""
  rng = np.random.default_rng(seed + 1000)
  batch, _, heads, key_dim = inputs["q"].shape
  state_shape = (batch, heads, key_dim, inputs["v"].shape[-1])
  return (jnp.asarray(rng.standard_normal(inputs["v"].shape), jnp.float32),
          jnp.asarray(rng.standard_normal(state_shape), jnp.float32))


def _assert_close(actual, expected, tol: float, name: str) -> None:
  """|actual - expected| <= tol * (1 + max |expected|), everywhere; both finite."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  assert np.all(np.isfinite(expected)), f"{name}: non-finite reference values"
  err, bound = np.max(np.abs(actual - expected)), tol * (1.0 + np.max(np.abs(expected)))
  assert err <= bound, f"{name}: max abs diff {err:.3g} > {bound:.3g}"


def _assert_pallas_matches_naive(family: str, inputs: dict, seed: int, tol: float = FP32_TOL) -> None:
  """Outputs, final state and all gradients of pallas (inputs in their dtype) equal naive's (inputs in fp32)."""
  do, d_state = _cotangent(inputs, seed)
  do = do.astype(inputs["v"].dtype)  # The cotangent of o has o's dtype; naive sees the same values in fp32.
  fp32_inputs = {n: None if x is None else x.astype(jnp.float32) for n, x in inputs.items()}
  (o_ref, s_ref), g_ref = _forward_and_vjp(fp32_inputs, (do.astype(jnp.float32), d_state), family, "naive")
  (o, s), grads = _forward_and_vjp(inputs, (do, d_state), family, "pallas")
  assert o.dtype == inputs["v"].dtype and s.dtype == jnp.float32
  _assert_close(o, o_ref, tol, "o")
  _assert_close(s, s_ref, tol, "final_state")
  for name, grad in grads.items():
    if inputs[name] is not None:
      assert grad.dtype == inputs[name].dtype, f"grad {name}: dtype {grad.dtype}"
      _assert_close(grad, g_ref[name], tol, f"grad {name}")


@pytest.mark.parametrize("dims,with_state", [(SMALL, True), (BLOCKED, False)])
@pytest.mark.parametrize("family", OPS)
def test_pallas_matches_naive(family, dims, with_state):
  _assert_pallas_matches_naive(family, _inputs(family, dims, seed=0, with_state=with_state), seed=0)


def hostile_gates(shape: tuple[int, ...], pattern: str, seed: int) -> jax.Array:
  """Log decays with the extremes seen in training.

  "zero": no decay anywhere. "scattered": weak decay, with -30, -1e4 or -inf (all channels) on a fifth of the
  tokens, the first token and the chunk and sub-chunk edges included. "per_channel": every entry drawn from
  0, weak, -30, -1e4, -inf.
  """
  rng = np.random.default_rng(seed)
  if pattern == "zero":
    return jnp.zeros(shape)
  if pattern == "per_channel":
    return jnp.asarray(rng.choice([0.0, -0.01, *HOSTILE_LOG_DECAYS], size=shape, p=[0.3, 0.4, 0.1, 0.1, 0.1]),
                       jnp.float32)
  g = np.full(shape, -0.01, np.float32)
  tokens = np.concatenate([[0, 15, 16, 31, 32], rng.choice(shape[1], size=shape[1] // 5, replace=False)])
  g[:, tokens] = rng.choice(HOSTILE_LOG_DECAYS, size=len(tokens)).reshape(-1, *[1] * (g.ndim - 2))
  return jnp.asarray(g)


@pytest.mark.parametrize("family,pattern", [
    ("simple_gla", "zero"), ("simple_gla", "scattered"),
    ("gla", "zero"), ("gla", "scattered"), ("gla", "per_channel"),
])
def test_hostile_gates_finite_and_match_naive(family, pattern):
  inputs = _inputs(family, SMALL, seed=1)
  inputs["g"] = hostile_gates(inputs["g"].shape, pattern, seed=1)
  _assert_pallas_matches_naive(family, inputs, seed=1)


def test_gla_diagonal_blocks_factored_and_looped():
  """gla's intra kernels factor a sub-chunk's diagonal block through a matmul when its decay span is at most
  intra.FACTORED_SPAN, else they loop over its pairs: sub-chunk 0 has a span just under the limit (factored,
  factors up to ~e^39), sub-chunk 1 one channel just over it (looped), in the same call; against naive."""
  inputs = _inputs("gla", SMALL, seed=5)  # SMALL's shapes: the compiled functions of test_pallas_matches_naive
  inputs["g"] = span_limit_gates(inputs["g"].shape, seed=5)
  _assert_pallas_matches_naive("gla", inputs, seed=5)


def span_limit_gates(shape: tuple[int, ...], seed: int) -> jax.Array:
  """gla log decays [batch, T, heads, K] (T >= 32) of weak decay, but for token 7 (sub-chunk 0's span just
  under intra.FACTORED_SPAN on every channel) and token 24 on channel 3 (sub-chunk 1's span just over it)."""
  rng = np.random.default_rng(seed)
  g = np.full(shape, -0.01, np.float32)
  g[:, 7] = -rng.uniform(intra.FACTORED_SPAN - 10.0, intra.FACTORED_SPAN - 1.0, size=g[:, 7].shape)
  g[:, 24, :, 3] = -(intra.FACTORED_SPAN + 5.0)
  return jnp.asarray(g)


@pytest.mark.parametrize("family", OPS)
def test_bf16_inputs(family):
  """Forward only: the backward's dtypes are covered on the GPU (tests/gpu), where bf16 runs fast."""
  inputs = _inputs(family, SMALL, seed=2)
  (o_ref, s_ref), _ = _forward_and_vjp(inputs, _cotangent(inputs, 2), family, "naive")
  bf16_inputs = {n: x.astype(jnp.bfloat16) for n, x in inputs.items()}
  o, s = jax.jit(functools.partial(OPS[family], impl="pallas", **TILING[family]))(**bf16_inputs)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  _assert_close(o, o_ref, BF16_TOL, "o")
  _assert_close(s, s_ref, BF16_TOL, "final_state")


@pytest.mark.parametrize("family,dims,tiling,match", [
    ("simple_gla", (1, 1, 24, 16), {}, "key_dim"),
    ("gla", (1, 1, 16, 8), {}, "value_dim"),
    ("simple_gla", SMALL, {"chunk_size": 48}, "chunk_size"),
    ("gla", SMALL, {"chunk_size": 32, "sub_chunk_size": 8}, "sub_chunk_size"),
])
def test_unsupported_sizes_raise(family, dims, tiling, match):
  inputs = _inputs(family, dims, seed=0)
  with pytest.raises(ValueError, match=match):
    OPS[family](**inputs, impl="pallas", **(TILING[family] | tiling))



@pytest.mark.parametrize("vector_decay", [False, True])
def test_split_scan_matches_one_walk(vector_decay):
  """The chunk scan cut into 8 runs of 2 chunks (11 chunks: a short run and two empty ones), with documents,
  against one walk over all chunks (which the op tests check against naive), both directions: every stored
  state and the final one. Vector decay: key channel 0 never decays, so the runs' folds carry it whole."""
  batch, heads, key_dim, value_dim, chunk, n_chunks = 2, 1, 32, 16, 16, 11
  rng = np.random.default_rng(3)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  seq, decay_dim = chunk * n_chunks, key_dim if vector_decay else 1
  g = jax.nn.log_sigmoid(2.0 + normal(batch, n_chunks, chunk, heads, decay_dim))
  if vector_decay:
    g = g.at[..., 0].set(0.0)
  ids = jnp.asarray(np.cumsum(rng.random((batch, seq)) < 0.03, axis=1), jnp.int32)
  args = (normal(batch, seq, heads, key_dim), normal(batch, seq, heads, value_dim),
          jnp.cumsum(g, axis=2).reshape(batch, seq, heads, decay_dim), normal(batch, heads, key_dim, value_dim),
          segments.chunk_documents(ids, chunk).reshape(batch, seq, 1))

  @jax.jit
  def both_ways(x, y, b, initial, docs):  # One compilation for all four scans.
    scan = functools.partial(state.chunk_scan, x, y, b, initial, chunk=chunk, factor=0.5, block_k=16,
                             block_v=16, docs=docs)
    return {(reverse, runs): scan(reverse=reverse, runs=runs) for reverse in (False, True) for runs in (1, 8)}

  scans = both_ways(*args)
  for reverse in (False, True):
    for name, split, whole in zip(("states", "final"), scans[reverse, 8], scans[reverse, 1]):
      _assert_close(split, whole, FP32_TOL, f"{name} (reverse={reverse})")


def test_gla_split_scan_and_recomputed_states_match_naive():
  """gla through pallas_recurrence with the chunk scan cut into 2 runs (3 chunks: a short run) in both
  directions and the chunk states recomputed in the backward (save_states=False): outputs, final state and
  every gradient against naive."""
  inputs = _inputs("gla", SMALL, seed=4)  # naive's compiled function is test_pallas_matches_naive's
  cotangent = _cotangent(inputs, seed=4)
  run = functools.partial(recurrence.pallas_recurrence, scale=SMALL[2]**-0.5, chunk_size=16, sub_chunk_size=16,
                          runs=2, save_states=False)

  @jax.jit
  def forward_and_vjp(x, cotangent):
    outputs, vjp = jax.vjp(lambda x: run(**x), x)
    return outputs, vjp(cotangent)[0]

  (o, s), grads = forward_and_vjp(inputs, cotangent)
  (o_ref, s_ref), grads_ref = _forward_and_vjp(inputs, cotangent, "gla", "naive")
  _assert_close(o, o_ref, FP32_TOL, "o")
  _assert_close(s, s_ref, FP32_TOL, "final_state")
  for name, grad in grads.items():
    _assert_close(grad, grads_ref[name], FP32_TOL, f"grad {name}")
