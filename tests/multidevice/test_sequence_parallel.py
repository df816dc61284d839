"""LASP-2 for every recurrence family, LASP-2H attention, sliding-window attention and short convolutions
across shard borders: sequence-split results on 8 CPU devices against the same op on whole sequences.

Meshes: sequence=8 and data=2,sequence=4. Sequences of 40 tokens with chunks of 8 give 5 and 10 tokens per
shard, neither a multiple of the chunk. Outputs, final states and the gradients with respect to every input
and the initial state (one vjp with random cotangents) agree within |err| <= 1e-5 * (1 + max |ref|), fp32.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linmoe.layers.conv import ShortConv
from linmoe.layers.lsm import FAMILIES
from linmoe.layers.window_attention import SlidingWindowAttention
from linmoe.parallel import lasp2, sequence

TOL = 1e-5
BATCH, SEQ, HEADS, KEY_DIM, VALUE_DIM = 2, 40, 2, 4, 3
TILING = {"chunk_size": 8}
SUB_TILING = {"chunk_size": 8, "sub_chunk_size": 4}  # the gla-based ops' intra sub-chunks
MESHES = {"sequence=8": (1, 8), "data=2,sequence=4": (2, 4)}


def make_mesh(name: str) -> Mesh:
  return Mesh(np.asarray(jax.devices()).reshape(MESHES[name]), ("data", "sequence"))


def assert_close(actual, expected, name: str, tol: float = TOL) -> None:
  """|actual - expected| <= tol * (1 + max |expected|) everywhere; both finite."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)) and np.all(np.isfinite(expected)), f"{name}: non-finite values"
  err, bound = np.max(np.abs(actual - expected)), tol * (1.0 + np.max(np.abs(expected)))
  assert err <= bound, f"{name}: max |err| {err:.3g} > {bound:.3g}"


def _inputs(family: str, seed: int) -> tuple:
  """The op's positional inputs for `family` (k L2-normalised for the delta rules); gla and delta_rule
  get a few extreme log decays (-inf, -1e4) too."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  lead = (BATCH, SEQ, HEADS)
  q, k, v = normal(*lead, KEY_DIM), normal(*lead, KEY_DIM), normal(*lead, VALUE_DIM)
  unit_k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  gate = lambda *shape: jax.nn.log_sigmoid(normal(*lead, *shape) + 2.0)
  unit = lambda *shape: jax.nn.sigmoid(normal(*lead, *shape))
  hostile = lambda g: g.at[:, 3].set(-jnp.inf).at[:, 17].set(-1e4)
  return {
      "simple_gla": lambda: (q, k, v, gate()),
      "simple_gla_no_decay": lambda: (q, k, v, None),
      "gla": lambda: (q, k, v, hostile(gate(KEY_DIM))),
      "gla_bonus": lambda: (q, k, v, gate(KEY_DIM), normal(HEADS, KEY_DIM)),  # u without a seq axis
      "diagonal_ssm": lambda: (q, k, v, gate(KEY_DIM, VALUE_DIM)),
      "delta_rule": lambda: (q, unit_k, v, unit(), hostile(gate())),
      "dplr": lambda: (q, k, v, -unit_k, unit_k * unit(KEY_DIM), gate(KEY_DIM)),
      "titans": lambda: (q, unit_k, v, 0.5 * unit(), gate(), gate()),
  }[family]()


CASES = {  # test name: (family, op keywords)
    "simple_gla": ("simple_gla", TILING), "simple_gla_no_decay": ("simple_gla", TILING),
    "gla": ("gla", SUB_TILING), "gla_bonus": ("gla_bonus", SUB_TILING),
    "diagonal_ssm": ("diagonal_ssm", TILING), "delta_rule": ("delta_rule", TILING),
    "dplr": ("dplr", SUB_TILING), "titans": ("titans", TILING),
}
# Every family on both meshes; the no-decay variant (g = None) on one.
CASE_MESHES = [(c, m) for c in CASES for m in MESHES if c != "simple_gla_no_decay" or m == "sequence=8"]


def _initial_state(family: str, seed: int):
  state = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
      (BATCH, HEADS, KEY_DIM, VALUE_DIM)), jnp.float32)
  return (state, 0.5 * state) if family == "titans" else state


def _outputs_and_grads(fn, seed: int, *args):
  """(fn(*args), the gradients w.r.t. every arg under random cotangents)."""
  out, vjp = jax.vjp(fn, *args)
  rng = np.random.default_rng(seed + 2)
  cotangent = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), out)
  return out, vjp(cotangent)


def assert_split_matches_whole(name: str, fn, args: tuple, mesh_name: str, expected=None, seed: int = 0,
                               batch: int = BATCH):
  """fn's outputs and gradients with the [batch, SEQ, ...] args split over the mesh's "data" and
  "sequence" axes (the others whole) equal those on one device (`expected`, else computed here)."""
  run = jax.jit(functools.partial(_outputs_and_grads, fn, seed))
  if expected is None:
    expected = run(*args)
  mesh = make_mesh(mesh_name)
  split = lambda x: x.ndim >= 3 and x.shape[:2] == (batch, SEQ)
  place = lambda x: NamedSharding(mesh, P("data", "sequence") if split(x) else P())
  with jax.set_mesh(mesh):
    actual = jax.jit(run, in_shardings=jax.tree.map(place, args))(*args)
  jax.tree.map_with_path(lambda path, a, e: assert_close(a, e, f"{name}{jax.tree_util.keystr(path)}"),
                         actual, expected)


def _op(case: str, split: bool):
  """The case's op as fn(inputs, initial_state) -> (o, final state), on whole or split sequences."""
  family, tiling = CASES[case]
  op = functools.partial(FAMILIES[family].sequence, impl="chunked", **tiling)
  if split:
    return lambda inputs, state: lasp2.lasp2(op, FAMILIES[family].carry, inputs, initial_state=state)
  return lambda inputs, state: op(*inputs, initial_state=state)


@functools.cache
def _reference(case: str, seed: int):
  args = (_inputs(case, seed), _initial_state(CASES[case][0], seed))
  return jax.jit(functools.partial(_outputs_and_grads, _op(case, split=False), seed))(*args)


@pytest.mark.parametrize("case,mesh_name", CASE_MESHES)
def test_lasp2_matches_one_device(case, mesh_name):
  """Outputs, final state and the gradients w.r.t. every input and the initial state."""
  args = (_inputs(case, 0), _initial_state(CASES[case][0], 0))
  assert_split_matches_whole(case, _op(case, split=True), args, mesh_name, _reference(case, 0))


def _qkv(seed: int) -> tuple[jax.Array, ...]:
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((BATCH, SEQ, HEADS, KEY_DIM)), jnp.float32) for _ in "qkv")


WINDOW = 6  # 5 keys of left context: all of a shard's 5 tokens on sequence=8


@functools.cache
def _layers() -> dict:
  """Layer name: (fn whose mode follows `split`, args); the gradients cover the conv's parameters."""
  conv = ShortConv(mode="train", width=4)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((BATCH, SEQ, 3)), jnp.float32)
  conv_params = conv.init(jax.random.key(0), x)
  window = SlidingWindowAttention(mode="train", window=WINDOW)
  return {
      "attention": (lambda q, k, v: (sequence.gathered_attention(q, k, v) if sequence.is_split("train")
                                     else jax.nn.dot_product_attention(q, k, v, is_causal=True)), _qkv(4)),
      "window_attention": (lambda q, k, v: window.apply({}, q, k, v, 0), _qkv(5)),
      "short_conv": (conv.apply, (conv_params, x)),
  }


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("layer", ["attention", "window_attention", "short_conv"])
def test_layer_across_shard_borders_matches_one_device(layer, mesh_name):
  """LASP-2H attention (keys and values gathered), sliding-window attention and the short convolution
  (left context from the previous shard): outputs and gradients."""
  fn, args = _layers()[layer]
  assert_split_matches_whole(layer, fn, args, mesh_name)
