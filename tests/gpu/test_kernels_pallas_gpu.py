"""impl="pallas" on an NVIDIA GPU (Triton lowering) against the references, at realistic shapes.

On the device: `python -m pytest -m gpu tests/gpu --noconftest -p no:cacheprovider -s` (-s prints the errors).
Free device memory is filled with NaN before every Pallas call, so an output element that no program writes
shows up as a non-finite value or a mismatch.
Tolerances, on max |actual - expected| / (1 + max |expected|): fp32 inputs with fp32 matmuls 1e-4; bf16 inputs
(the kernels' matmuls take bf16 operands, fp32 accumulation) 2e-2 against naive on the same bf16 values in fp32.
Packed documents (segment ids): the same tolerances, against `chunked` run on each document alone in fp32
(tests/test_kernels_segments.py checks chunked against the token loop there).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from tests.test_kernels_pallas import hostile_gates, span_limit_gates
from tests.test_kernels_segments import layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")]

HEADS, DIM = 8, 128
FP32_TOL = 1e-4
BF16_TOL = 2e-2
POISON_BYTES = 8 << 30
OPS = {"simple_gla": kernels.simple_gla, "gla": kernels.gla}


def _poison_free_memory() -> None:
  """Fills POISON_BYTES of the allocator's free device memory with NaN (the next arrays reuse it)."""
  poison = jnp.full((POISON_BYTES // 4,), jnp.nan, jnp.float32).block_until_ready()
  poison.delete()


def _inputs(family: str, batch: int, seq_len: int, dtype: jnp.dtype, seed: int) -> dict:
  """q, k, v, g (log_sigmoid of a shifted normal: mostly weak decay, some strong) and an initial state."""
  keys = jax.random.split(jax.random.key(seed), 5)
  lead = (batch, seq_len, HEADS)
  g_shape = (*lead, DIM) if family == "gla" else lead
  return {
      "q": jax.random.normal(keys[0], (*lead, DIM), dtype),
      "k": jax.random.normal(keys[1], (*lead, DIM), dtype),
      "v": jax.random.normal(keys[2], (*lead, DIM), dtype),
      "g": jax.nn.log_sigmoid(3.0 + 2.0 * jax.random.normal(keys[3], g_shape, jnp.float32)).astype(dtype),
      "initial_state": jax.random.normal(keys[4], (batch, HEADS, DIM, DIM), jnp.float32),
  }


def _cotangent(inputs: dict, seed: int) -> tuple[jax.Array, jax.Array]:
  """Random cotangents of (o in v's dtype, final_state fp32)."""
  k_o, k_s = jax.random.split(jax.random.key(seed + 1000))
  v, state = inputs["v"], inputs["initial_state"]
  return jax.random.normal(k_o, v.shape, v.dtype), jax.random.normal(k_s, state.shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("family", "impl"))
def _forward(inputs: dict, family: str, impl: str,
             segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  return OPS[family](**inputs, impl=impl, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnames=("family", "impl"))
def _forward_and_vjp(inputs: dict, cotangent: tuple, family: str, impl: str,
                     segment_ids: jax.Array | None = None) -> tuple[tuple, dict]:
  outputs, vjp = jax.vjp(lambda x: OPS[family](**x, impl=impl, segment_ids=segment_ids), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


def _upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _check(actual: dict, expected: dict, tol: float, label: str) -> None:
  """Prints each array's error; asserts all finite and within tol."""
  failures = []
  for name, exp in expected.items():
    act, exp = np.asarray(actual[name], np.float64), np.asarray(exp, np.float64)
    err = float(np.max(np.abs(act - exp)) / (1.0 + np.max(np.abs(exp))))
    finite = bool(np.all(np.isfinite(act)))
    print(f"{label} {name}: rel err {err:.2e}{'' if finite else ' NON-FINITE'}")
    if not finite or err > tol:
      failures.append(f"{name} (err {err:.2e}, finite {finite})")
  assert not failures, f"{label}: {', '.join(failures)} over tol {tol}"


def _compare_with_grads(family: str, inputs: dict, reference: str, tol: float, label: str) -> None:
  """Outputs, final state and all gradients of pallas against `reference` run on fp32 copies of the inputs."""
  cotangent = _cotangent(inputs, 7)
  with jax.default_matmul_precision("highest"):
    (o_ref, s_ref), g_ref = _forward_and_vjp(_upcast(inputs), _upcast(cotangent), family, reference)
    _poison_free_memory()
    (o, s), grads = _forward_and_vjp(inputs, cotangent, family, "pallas")
  assert o.dtype == inputs["v"].dtype and s.dtype == jnp.float32
  assert all(grads[n].dtype == x.dtype for n, x in inputs.items())
  _check({"o": o, "final_state": s} | grads, {"o": o_ref, "final_state": s_ref} | g_ref, tol, label)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("family", OPS)
def test_grads_match_naive(family, dtype, tol):
  """T = 1000 is no multiple of the chunk: the padded tail is covered."""
  inputs = _inputs(family, batch=2, seq_len=1000, dtype=dtype, seed=0)
  _compare_with_grads(family, inputs, "naive", tol, f"{family} {jnp.dtype(dtype).name} T=1000")


@pytest.mark.parametrize("family,pattern", [
    ("simple_gla", "zero"), ("simple_gla", "scattered"),
    ("gla", "zero"), ("gla", "scattered"), ("gla", "per_channel"),
])
def test_hostile_gates_match_naive(family, pattern):
  """fp32, T = 700: log decays of exactly 0, or -30, -1e4 and -inf amid weak decay (scattered tokens, or per
  key channel for gla; `hostile_gates`): outputs, state and every gradient finite and equal to naive's."""
  inputs = _inputs(family, batch=2, seq_len=700, dtype=jnp.float32, seed=4)
  inputs["g"] = hostile_gates(inputs["g"].shape, pattern, seed=4)
  _compare_with_grads(family, inputs, "naive", FP32_TOL, f"{family} float32 hostile {pattern}")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_gla_diagonal_blocks_factored_and_looped(dtype, tol):
  """One sub-chunk whose decay span is just under intra.FACTORED_SPAN (its diagonal block through the factored
  matmul, factors up to ~e^39) and one just over it (the pair loop), in one call, against naive."""
  inputs = _inputs("gla", batch=2, seq_len=700, dtype=dtype, seed=5)
  inputs["g"] = span_limit_gates(inputs["g"].shape, seed=5).astype(dtype)
  _compare_with_grads("gla", inputs, "naive", tol, f"gla {jnp.dtype(dtype).name} factored span limit")


@pytest.mark.parametrize("family", OPS)
def test_long_sequence_grads_match_chunked(family):
  """At 16K tokens the naive scan's saved states are too large; chunked is tested against naive elsewhere."""
  inputs = _inputs(family, batch=1, seq_len=16384, dtype=jnp.float32, seed=1)
  _compare_with_grads(family, inputs, "chunked", FP32_TOL, f"{family} float32 T=16384 vs chunked")


@pytest.mark.parametrize("seq_len", [16384, 65536])
@pytest.mark.parametrize("family", OPS)
def test_long_sequence_forward_matches_naive(family, seq_len):
  """bf16, batch 4: 4 * 8 heads * 4 key-value blocks = 128 programs in the chunk scan."""
  inputs = _inputs(family, batch=4, seq_len=seq_len, dtype=jnp.bfloat16, seed=2)
  with jax.default_matmul_precision("highest"):
    o_ref, s_ref = _forward(_upcast(inputs), family, "naive")
  _poison_free_memory()
  o, s = _forward(inputs, family, "pallas")
  _check({"o": o, "final_state": s}, {"o": o_ref, "final_state": s_ref}, BF16_TOL,
         f"{family} bfloat16 T={seq_len}")


def _document_lengths(batch: int, seq_len: int, n_docs: int, seed: int) -> list[list[int]]:
  """Random document lengths, n_docs per row; row 0 also has a one-token document and a boundary on a chunk
  edge (1024)."""
  rng = np.random.default_rng(seed)
  rows = []
  for b in range(batch):
    forced = [1024, 1500, 1501] if b == 0 else []
    cuts = rng.choice(np.setdiff1d(np.arange(1, seq_len), forced), n_docs - 1 - len(forced), replace=False)
    edges = np.concatenate([[0], np.sort(np.concatenate([cuts, forced])), [seq_len]]).astype(int)
    rows.append(np.diff(edges).tolist())
  return rows


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("family", OPS)
def test_packed_matches_separate(family, dtype, tol):
  """4 x 4K tokens, 8 documents per row: pallas with segment ids on the packed rows against chunked on every
  document alone (zero initial state but for each row's first document), outputs, the final state of each
  row's last document and every gradient; then impl="auto" takes the same kernels."""
  lay = layout(_document_lengths(batch=4, seq_len=4096, n_docs=8, seed=3))
  segment_ids = jnp.asarray(lay.segment_ids)
  inputs = _inputs(family, batch=4, seq_len=4096, dtype=dtype, seed=3)
  separate = {n: lay.separate(x) for n, x in inputs.items() if n != "initial_state"}
  separate["initial_state"] = lay.first_doc_only(inputs["initial_state"])
  do, d_final = _cotangent(inputs, 7)
  with jax.default_matmul_precision("highest"):
    (o_ref, s_ref), g_ref = _forward_and_vjp(
        _upcast(separate), _upcast((lay.separate(do), lay.last_doc_only(d_final))), family, "chunked")
    _poison_free_memory()
    (o, s), grads = _forward_and_vjp(inputs, (do, d_final), family, "pallas", segment_ids)
  expected = {"o": lay.packed(o_ref), "final_state": s_ref[lay.last],
              "initial_state": g_ref["initial_state"][lay.first]}
  expected |= {n: lay.packed(g_ref[n]) for n in ("q", "k", "v", "g")}
  assert o.dtype == inputs["v"].dtype and all(grads[n].dtype == x.dtype for n, x in inputs.items())
  _check({"o": o, "final_state": s} | grads, expected, tol, f"{family} {jnp.dtype(dtype).name} packed 4x4096")
  auto = jax.make_jaxpr(lambda x, ids: _forward(x, family, "auto", ids))(inputs, segment_ids)
  assert "pallas_call" in str(auto), "impl='auto' with segment ids did not take the Pallas kernels"
