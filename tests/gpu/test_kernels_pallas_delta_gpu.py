"""delta_rule impl="pallas" on an NVIDIA GPU (Triton lowering) against the references, at realistic shapes.

On the device: `python -m pytest -m gpu tests/gpu --noconftest -p no:cacheprovider -s` (-s prints the errors).
Free device memory is filled with NaN before every Pallas call, so an output element that no program writes
shows up as a non-finite value or a mismatch.
Tolerances, on max |actual - expected| / (1 + max |expected|): fp32 inputs with fp32 matmuls 1e-4; bf16 inputs
(bf16 matmul operands, fp32 accumulation and states) BF16_TOL against naive on the same bf16 values in fp32.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.kernels.pallas import delta as pallas_delta
from tests.gpu.test_kernels_pallas_gpu import _check, _poison_free_memory, _upcast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")]

HEADS, DIM = 8, 128
FP32_TOL = 1e-4
BF16_TOL = 3e-2


def _inputs(batch: int, seq_len: int, dtype: jnp.dtype, seed: int, gated: bool = True,
            key_dim: int = DIM) -> dict:
  """q, L2-normalised k, v, beta in (0, 1), g (log_sigmoid of a shifted normal) or None, an initial state."""
  keys = jax.random.split(jax.random.key(seed), 6)
  lead = (batch, seq_len, HEADS)
  k = jax.random.normal(keys[1], (*lead, key_dim), jnp.float32)
  return {
      "q": jax.random.normal(keys[0], (*lead, key_dim), dtype),
      "k": (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype),
      "v": jax.random.normal(keys[2], (*lead, DIM), dtype),
      "beta": jax.nn.sigmoid(jax.random.normal(keys[3], lead, jnp.float32)).astype(dtype),
      "g": jax.nn.log_sigmoid(3.0 + 2.0 * jax.random.normal(keys[4], lead, jnp.float32)) if gated else None,
      "initial_state": jax.random.normal(keys[5], (batch, HEADS, key_dim, DIM), jnp.float32),
  }


def _cotangent(inputs: dict, seed: int) -> tuple[jax.Array, jax.Array]:
  """Random cotangents of (o in v's dtype, final_state fp32)."""
  k_o, k_s = jax.random.split(jax.random.key(seed + 1000))
  v, state = inputs["v"], inputs["initial_state"]
  return jax.random.normal(k_o, v.shape, v.dtype), jax.random.normal(k_s, state.shape, jnp.float32)


@functools.partial(jax.jit, static_argnames="impl")
def _forward(inputs: dict, impl: str) -> tuple[jax.Array, jax.Array]:
  return kernels.delta_rule(**inputs, impl=impl)


@functools.partial(jax.jit, static_argnames="impl")
def _forward_and_vjp(inputs: dict, cotangent: tuple, impl: str) -> tuple[tuple, dict]:
  outputs, vjp = jax.vjp(lambda x: kernels.delta_rule(**x, impl=impl), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


def _compare_with_grads(inputs: dict, reference: str, tol: float, label: str, impl: str = "pallas") -> None:
  """Outputs, final state and all gradients of `impl` against `reference` run on fp32 copies of the inputs."""
  inputs = {n: x for n, x in inputs.items() if x is not None}
  cotangent = _cotangent(inputs, 7)
  with jax.default_matmul_precision("highest"):
    (o_ref, s_ref), g_ref = _forward_and_vjp(_upcast(inputs), _upcast(cotangent), reference)
    _poison_free_memory()
    (o, s), grads = _forward_and_vjp(inputs, cotangent, impl)
  assert o.dtype == inputs["v"].dtype and s.dtype == jnp.float32
  assert all(grads[n].dtype == x.dtype for n, x in inputs.items())
  _check({"o": o, "final_state": s} | grads, {"o": o_ref, "final_state": s_ref} | g_ref, tol, label)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_grads_match_naive(dtype, tol, gated):
  """T = 1000 is no multiple of the chunk: the padded tail is covered."""
  inputs = _inputs(batch=2, seq_len=1000, dtype=dtype, seed=0, gated=gated)
  _compare_with_grads(inputs, "naive", tol, f"{jnp.dtype(dtype).name} gated={gated} T=1000")


def test_key_dim_64_grads_match_naive():
  inputs = _inputs(batch=1, seq_len=300, dtype=jnp.float32, seed=3, key_dim=64)
  _compare_with_grads(inputs, "naive", FP32_TOL, "float32 key_dim=64 T=300")


def test_hostile_gates_and_beta_match_naive():
  """g in {-30, -1e4, -inf} on scattered tokens amid weak decay, long stretches of g = 0, beta 0 and 1."""
  inputs = _inputs(batch=2, seq_len=700, dtype=jnp.float32, seed=4)
  rng = np.random.default_rng(4)
  g = np.full(inputs["beta"].shape, -0.01, np.float32)
  g[:, 200:400] = 0.0
  tokens = np.concatenate([[0, 63, 64, 127], rng.choice(700, size=100, replace=False)])
  g[:, tokens] = rng.choice([-30.0, -1e4, -np.inf], size=len(tokens))[None, :, None]
  beta = np.array(inputs["beta"])
  beta[:, rng.choice(700, size=100, replace=False)] = 0.0
  beta[:, rng.choice(700, size=100, replace=False)] = 1.0
  inputs |= {"g": jnp.asarray(g), "beta": jnp.asarray(beta)}
  _compare_with_grads(inputs, "naive", FP32_TOL, "float32 hostile gates")


def test_long_sequence_grads_match_chunked():
  """At 16K tokens the naive scan's saved states are too large; chunked is tested against naive elsewhere."""
  inputs = _inputs(batch=1, seq_len=16384, dtype=jnp.float32, seed=1)
  _compare_with_grads(inputs, "chunked", FP32_TOL, "float32 T=16384 vs chunked")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_split_scans_match_chunked(monkeypatch, dtype, tol):
  """The scans cut into 8 runs (`pallas_delta.SPLIT_SCANS` picks that at 256 chunks) at 1 x 16K, under an impl
  name of its own so that no compiled "pallas" call is reused."""
  delta_rule_module = importlib.import_module("linmoe.kernels.delta_rule")  # The package attribute is the op.
  monkeypatch.setitem(delta_rule_module._IMPLS, "pallas_split",
                      functools.partial(pallas_delta.pallas_delta_rule, runs=8))
  inputs = _inputs(batch=1, seq_len=16384, dtype=dtype, seed=8)
  _compare_with_grads(inputs, "chunked", tol, f"{jnp.dtype(dtype).name} T=16384 split vs chunked", "pallas_split")


@pytest.mark.parametrize("batch,seq_len", [(2, 65536), (32, 2048)])
def test_long_or_wide_forward_matches_naive(batch, seq_len):
  """bf16: T = 64K (16 x 4 value-block programs), and batch * heads = 256 (the wide value block)."""
  inputs = _inputs(batch=batch, seq_len=seq_len, dtype=jnp.bfloat16, seed=2)
  with jax.default_matmul_precision("highest"):
    o_ref, s_ref = _forward(_upcast(inputs), "naive")
  _poison_free_memory()
  o, s = _forward(inputs, "pallas")
  _check({"o": o, "final_state": s}, {"o": o_ref, "final_state": s_ref}, BF16_TOL,
         f"bfloat16 {batch}x{seq_len}")


def _packed_layout(batch: int, seq_len: int, docs_per_row: int, seed: int) -> dict:
  """Random document lengths (docs_per_row per row, at least one token each): the segment ids [batch, seq]
  and, per document, its row, start and length."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.choice(np.arange(1, seq_len), size=(batch, docs_per_row - 1), replace=False), axis=1)
  edges = np.concatenate([np.zeros((batch, 1), int), cuts, np.full((batch, 1), seq_len)], axis=1)
  ids = np.stack([np.repeat(np.arange(docs_per_row), np.diff(e)) for e in edges]).astype(np.int32)
  return {"segment_ids": ids + 5, "row": np.repeat(np.arange(batch), docs_per_row),
          "start": edges[:, :-1].reshape(-1), "length": np.diff(edges, axis=1).reshape(-1)}


def _separate(x: jax.Array, lay: dict) -> jax.Array:
  """[batch, seq, ...] -> [n_docs, max_len, ...], each document from position 0, zeros after its end."""
  pos = np.arange(lay["length"].max())[None]
  valid = pos < lay["length"][:, None]
  gathered = x[lay["row"][:, None], np.where(valid, lay["start"][:, None] + pos, 0)]
  return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), gathered, 0)


def _packed(y: jax.Array, lay: dict, shape: tuple[int, int]) -> jax.Array:
  """[n_docs, max_len, ...] -> [batch, seq, ...], the inverse of `_separate`."""
  doc = np.repeat(np.arange(len(lay["row"])), lay["length"]).reshape(shape)
  return y[doc, np.arange(shape[1])[None] - lay["start"][doc]]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_packed_matches_separate_documents(dtype, tol):
  """4 x 4K tokens, 8 random documents per row: pallas with segment ids on the packed rows (poisoned memory)
  against chunked on each document alone in fp32 (zero padding after a document's end changes nothing: beta
  and g are 0 there): outputs, final state of each row's last document, all gradients."""
  batch, seq_len = 4, 4096
  lay = _packed_layout(batch, seq_len, docs_per_row=8, seed=6)
  inputs = _inputs(batch=batch, seq_len=seq_len, dtype=dtype, seed=6)
  cotangent = _cotangent(inputs, 6)
  n_docs = len(lay["row"])
  first, last = np.arange(0, n_docs, 8), np.arange(7, n_docs, 8)
  separate = {n: _separate(x, lay) if n != "initial_state" else x for n, x in _upcast(inputs).items()}
  separate["initial_state"] = jnp.zeros((n_docs, *inputs["initial_state"].shape[1:])).at[first].set(
      inputs["initial_state"])
  sep_cotangent = (_separate(cotangent[0].astype(jnp.float32), lay),
                   jnp.zeros(separate["initial_state"].shape).at[last].set(cotangent[1]))
  with jax.default_matmul_precision("highest"):
    (o_ref, s_ref), g_ref = _forward_and_vjp(separate, sep_cotangent, "chunked")
    segment_ids = jnp.asarray(lay["segment_ids"])
    _poison_free_memory()
    (o, s), grads = _packed_forward_and_vjp(inputs, segment_ids, cotangent)
  expected = {"o": _packed(o_ref, lay, (batch, seq_len)), "final_state": s_ref[last]}
  expected |= {n: _packed(g, lay, (batch, seq_len)) for n, g in g_ref.items() if n != "initial_state"}
  expected["initial_state"] = g_ref["initial_state"][first]
  _check({"o": o, "final_state": s} | grads, expected, tol, f"{jnp.dtype(dtype).name} packed 4x4096")


@jax.jit
def _packed_forward_and_vjp(inputs: dict, segment_ids: jax.Array, cotangent: tuple) -> tuple[tuple, dict]:
  outputs, vjp = jax.vjp(lambda x: kernels.delta_rule(**x, segment_ids=segment_ids, impl="pallas"), inputs)
  (grads,) = vjp(cotangent)
  return outputs, grads


def test_auto_picks_pallas():
  delta_rule_module = importlib.import_module("linmoe.kernels.delta_rule")  # The package attribute is the op.
  inputs = _inputs(batch=1, seq_len=64, dtype=jnp.bfloat16, seed=5)
  assert delta_rule_module.auto_impl(inputs["q"], inputs["v"], 64) == "pallas"
