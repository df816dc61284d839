"""The Pallas (Triton) and Mosaic GPU grouped matmuls on the GPU, against the dense masked reference.

At the A0.3B-2B expert shape: 16384 tokens * top-8 = 131072 rows, 64 experts, d_model 1024, d_ff 896,
bf16; even groups and one expert with 10x its share. The Mosaic kernels (Hopper only) also at a small
shape with uneven, empty and one-row groups and rows past the sum (NaN there in the inputs). Each kernel
writes into a NaN-poisoned output, so that unwritten tiles show.

  python3 -m pytest -m gpu tests/gpu/test_grouped_matmul_gpu.py --noconftest -p no:cacheprovider
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linmoe import kernels
from linmoe.kernels import grouped_matmul_mosaic as gmm_mosaic
from linmoe.kernels import grouped_matmul_pallas as gmp

pytestmark = pytest.mark.gpu

ROWS, EXPERTS, D_MODEL, D_FF = 16384 * 8, 64, 1024, 896
SKEW = 10
# bf16 operands and output, fp32 accumulation: ||err|| / ||ref|| lands near 3e-3; max |err| / max |ref|
# catches a single wrong row, which the norm would hide.
REL_NORM_TOL, REL_MAX_TOL = 1e-2, 2e-2


def _group_sizes(layout: str) -> jax.Array:
  share = ROWS // EXPERTS
  first = share * SKEW if layout == "skewed" else share
  rest, extra = divmod(ROWS - first, EXPERTS - 1)
  sizes = np.full(EXPERTS, rest, np.int32)
  sizes[0] = first
  sizes[1:1 + extra] += 1
  assert sizes.sum() == ROWS
  return jnp.asarray(sizes)


@pytest.fixture(scope="module", params=["even", "skewed"])
def case(request) -> dict:
  """bf16 inputs, group sizes, and the fp32 reference out, dx and dw for one layout."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  kx, kw, kc = jax.random.split(jax.random.key(len(request.param)), 3)
  x = jax.random.normal(kx, (ROWS, D_MODEL), jnp.bfloat16)
  w = (jax.random.normal(kw, (EXPERTS, D_MODEL, D_FF), jnp.float32) * D_MODEL**-0.5).astype(jnp.bfloat16)
  dy = jax.random.normal(kc, (ROWS, D_FF), jnp.bfloat16)
  sizes = _group_sizes(request.param)

  @jax.jit
  def reference(x, w, dy):
    matmul = lambda a, b: kernels.grouped_matmul(a, b, sizes, impl="reference")  # noqa: E731
    out, vjp = jax.vjp(matmul, x.astype(jnp.float32), w.astype(jnp.float32))
    return (out, *vjp(dy.astype(jnp.float32)))

  with jax.default_matmul_precision("highest"):
    out, dx, dw = reference(x, w, dy)
  return {"x": x, "w": w, "dy": dy, "sizes": sizes, "out": out, "dx": dx, "dw": dw}


def _assert_close(actual: jax.Array, expected: jax.Array, name: str) -> None:
  actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
  assert bool(jnp.all(jnp.isfinite(actual))), f"{name}: unwritten (NaN) or non-finite elements"
  err = actual - expected
  rel_norm = float(jnp.linalg.norm(err) / jnp.linalg.norm(expected))
  rel_max = float(jnp.max(jnp.abs(err)) / jnp.max(jnp.abs(expected)))
  assert rel_norm < REL_NORM_TOL and rel_max < REL_MAX_TOL, f"{name}: {rel_norm=:.2e} {rel_max=:.2e}"


def _poison(shape: tuple[int, ...]) -> jax.Array:
  return jnp.full(shape, jnp.nan, jnp.bfloat16)


def test_forward_kernel(case: dict):
  offsets = gmp.group_offsets(case["sizes"], ROWS)
  out = jax.jit(gmp.gmm, static_argnums=3)(case["x"], case["w"], offsets, gmp.Config().forward,
                                           out=_poison((ROWS, D_FF)))
  _assert_close(out, case["out"], "out")


def test_input_grad_kernel(case: dict):
  offsets = gmp.group_offsets(case["sizes"], ROWS)
  fn = jax.jit(gmp.gmm, static_argnums=3, static_argnames="transpose_rhs")
  dx = fn(case["dy"], case["w"], offsets, gmp.Config().input_grad, transpose_rhs=True,
          out=_poison((ROWS, D_MODEL)))
  _assert_close(dx, case["dx"], "dx")


def test_weight_grad_kernel(case: dict):
  offsets = gmp.group_offsets(case["sizes"], ROWS)
  dw = jax.jit(gmp.tgmm, static_argnums=(3, 4))(case["x"], case["dy"], offsets, gmp.Config().weight_grad,
                                                jnp.bfloat16, out=_poison((EXPERTS, D_MODEL, D_FF)))
  _assert_close(dw, case["dw"], "dw")


def _is_hopper() -> bool:
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _needs_hopper() -> None:
  if jax.default_backend() != "gpu" or not _is_hopper():
    pytest.skip("the Mosaic kernels need a Hopper GPU")


def test_mosaic_kernels(case: dict):
  """The Mosaic forward and input-gradient kernels (defaults) and its weight-gradient kernel (an option)."""
  _needs_hopper()
  gmm = jax.jit(gmm_mosaic.gmm, static_argnums=3, static_argnames="transpose_rhs")
  out = gmm(case["x"], case["w"], case["sizes"], gmm_mosaic.GmmTiling(), out=_poison((ROWS, D_FF)))
  _assert_close(out, case["out"], "out")
  dx = gmm(case["dy"], case["w"], case["sizes"], gmm_mosaic.GmmTiling(), transpose_rhs=True,
           out=_poison((ROWS, D_MODEL)))
  _assert_close(dx, case["dx"], "dx")
  tgmm = jax.jit(gmm_mosaic.tgmm, static_argnums=(3, 4))
  dw = tgmm(case["x"], case["dy"], case["sizes"], gmm_mosaic.TgmmTiling(), jnp.bfloat16,
            out=_poison((EXPERTS, D_MODEL, D_FF)))
  _assert_close(dw, case["dw"], "dw")


SMALL_ROWS, SMALL_K, SMALL_N, SMALL_GROUPS = 512, 256, 384, 5
# Uneven with a one-row group and rows past the sum; empty groups around one holding every row; none at all.
SMALL_LAYOUTS = [(3, 200, 0, 1, 250), (0, 0, SMALL_ROWS, 0, 0), (0,) * SMALL_GROUPS]


def _output_and_grads(impl: str, x: jax.Array, w: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> tuple:
  out, vjp = jax.vjp(lambda a, b: kernels.grouped_matmul(a, b, group_sizes, impl=impl), x, w)
  return (out, *vjp(dy))


@jax.jit
def _small_paths(x: jax.Array, w: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> tuple:
  """(reference, Mosaic custom VJP, Mosaic kernels into poisoned outputs), each (out, dx, dw)."""
  finite = lambda a: jnp.nan_to_num(a.astype(jnp.float32), nan=0.0)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    expected = _output_and_grads("reference", finite(x), finite(w), finite(dy), group_sizes)
  tiling = gmm_mosaic.GmmTiling()
  kernels_alone = (
      gmm_mosaic.gmm(x, w, group_sizes, tiling, out=_poison((SMALL_ROWS, SMALL_N))),
      gmm_mosaic.gmm(dy, w, group_sizes, tiling, transpose_rhs=True, out=_poison((SMALL_ROWS, SMALL_K))),
      gmm_mosaic.tgmm(x, dy, group_sizes, gmm_mosaic.TgmmTiling(), out=_poison(w.shape)))
  return expected, _output_and_grads("mosaic", x, w, dy, group_sizes), kernels_alone


@pytest.mark.parametrize("sizes", SMALL_LAYOUTS, ids=["uneven_tail", "one_group", "all_empty"])
def test_mosaic_small(sizes: tuple[int, ...]):
  """Both Mosaic paths (the custom VJP with its default weight gradient, and each kernel into a poisoned
  output) against the reference; rows past the sum hold NaN in x and dy, and must give zeros."""
  _needs_hopper()
  kx, kw, kc = jax.random.split(jax.random.key(sum(sizes)), 3)
  used = sum(sizes)
  x = jax.random.normal(kx, (SMALL_ROWS, SMALL_K), jnp.bfloat16).at[used:].set(jnp.nan)
  w = (jax.random.normal(kw, (SMALL_GROUPS, SMALL_K, SMALL_N)) * SMALL_K**-0.5).astype(jnp.bfloat16)
  dy = jax.random.normal(kc, (SMALL_ROWS, SMALL_N), jnp.bfloat16).at[used:].set(jnp.nan)
  expected, *paths = _small_paths(x, w, dy, jnp.asarray(sizes, jnp.int32))
  for path, results in zip(("vjp", "kernels"), paths):
    for name, a, e in zip(("out", "dx", "dw"), results, expected):
      a32 = a.astype(jnp.float32)
      assert bool(jnp.all(jnp.isfinite(a32))), f"{path} {name}: unwritten (NaN) or non-finite elements"
      assert float(jnp.max(jnp.abs(a32 - e))) <= 2e-2 * (1.0 + float(jnp.max(jnp.abs(e)))), f"{path} {name}"
    out, dx, dw = results
    assert not bool(jnp.any(out[used:])) and not bool(jnp.any(dx[used:])), f"{path}: rows past the sum"
    assert not bool(jnp.any(dw[np.asarray(sizes) == 0])), f"{path}: empty groups"


def test_auto_with_both_gradients(case: dict):
  """The public op under "auto" (Mosaic on Hopper, else the Pallas kernels) and its custom VJP."""
  expected = "mosaic" if _is_hopper() else "pallas"
  assert importlib.import_module("linmoe.kernels.grouped_matmul").auto_impl(jnp.bfloat16) == expected

  @jax.jit
  def run(x, w, dy):
    out, vjp = jax.vjp(lambda a, b: kernels.grouped_matmul(a, b, case["sizes"]), x, w)
    return (out, *vjp(dy))

  for name, actual in zip(("out", "dx", "dw"), run(case["x"], case["w"], case["dy"])):
    _assert_close(actual, case[name], name)
