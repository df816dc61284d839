"""Every Pallas (Triton) kernel lowers for an H100 from this CPU-only machine, forward and backward, with and
without segment ids. Interpret mode (what the other CPU tests run) skips the GPU lowering, which has caught
bugs interpret mode did not (an alignment hint on a Python int); this test runs it without a GPU. It lowers to
Triton IR only: ptxas and the run itself are left to `pytest -m gpu`."""
import jax
import jax.numpy as jnp
import pytest

from linmoe import kernels
from linmoe.kernels.pallas import _platform
from linmoe.kernels.pallas import delta as pallas_delta

B, H, D = 1, 2, 64
T = 128 * 16 + 5  # chunks of 16: >= 128 chunks, so the split scan is lowered too, plus a ragged tail
SHAPE = jax.ShapeDtypeStruct


def _h100_mesh():
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device)


def _lower_for_cuda(fn, *args) -> str:
  with jax.sharding.use_abstract_mesh(_h100_mesh()):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _op(family: str):
  """(op(q, k, v, g, h0, segment_ids) -> (out, final state), the gate's shape) for one family."""
  if family == "simple_gla":
    return lambda q, k, v, g, h0, s: kernels.simple_gla(q, k, v, g[..., 0], initial_state=h0, segment_ids=s,
                                                        impl="pallas", chunk_size=16), (B, T, H, 1)
  if family == "gla":
    return lambda q, k, v, g, h0, s: kernels.gla(q, k, v, g, initial_state=h0, segment_ids=s, impl="pallas",
                                                 chunk_size=16), (B, T, H, D)
  if family == "gated_delta_rule_4_runs":  # the delta rule's scans split into runs (not yet the default)
    return lambda q, k, v, g, h0, s: pallas_delta.pallas_delta_rule(
        q, k, v, jax.nn.sigmoid(g[..., 0]), g, scale=D**-0.5, initial_state=h0, segment_ids=s,
        runs=4), (B, T, H, 1)
  gated = family == "gated_delta_rule"
  return lambda q, k, v, g, h0, s: kernels.delta_rule(q, k, v, jax.nn.sigmoid(g[..., 0]),
                                                      g[..., 0] if gated else None, initial_state=h0,
                                                      segment_ids=s, impl="pallas"), (B, T, H, 1)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("family", ["simple_gla", "gla", "delta_rule", "gated_delta_rule", "gated_delta_rule_4_runs"])
def test_recurrence_kernels_lower_for_cuda(monkeypatch, family, packed):
  monkeypatch.setattr(_platform, "interpret_mode", lambda: False)
  op, gate_shape = _op(family)
  x, state = SHAPE((B, T, H, D), jnp.bfloat16), SHAPE((B, H, D, D), jnp.float32)

  def fwd_bwd(q, k, v, g, h0, segment_ids):
    out, vjp = jax.vjp(lambda *a: op(*a, segment_ids if packed else None), q, k, v, g, h0)
    return out, vjp(out)

  text = _lower_for_cuda(fwd_bwd, x, x, x, SHAPE(gate_shape, jnp.float32), state, SHAPE((B, T), jnp.int32))
  assert "triton" in text


def test_grouped_matmul_lowers_for_cuda(monkeypatch):
  monkeypatch.setattr(_platform, "interpret_mode", lambda: False)
  x, w = SHAPE((512, 128), jnp.bfloat16), SHAPE((4, 128, 256), jnp.bfloat16)

  def fwd_bwd(x, w, sizes):
    out, vjp = jax.vjp(lambda a, b: kernels.grouped_matmul(a, b, sizes, impl="pallas"), x, w)
    return out, vjp(out)

  assert "triton" in _lower_for_cuda(fwd_bwd, x, w, SHAPE((4,), jnp.int32))
