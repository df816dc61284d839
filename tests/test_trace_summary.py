"""benchmarks/trace_summary.py: HLO names to model parts, and a real CPU trace summed by part."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_summary as ts

STACK = "jit(train_step)/transpose(jvp(LinearMoELM))/while/body/layers/checkpoint/"


@pytest.mark.parametrize("op_name, text, part, phase", [
    (STACK + "block_0/moe/pallas_call", 'custom-call(), custom_call_target="__gpu$xla.gpu.triton"',
     "MoE grouped matmuls", "backward"),
    (STACK + "block_0/moe/gather", "gather()", "MoE routing, sort, gather", "backward"),
    (STACK + "rematted_computation/block_0/mixer_norm/mul", "multiply()", "norms", "recompute"),
    ("jit(train_step)/jvp(LinearMoELM)/layers/block_0/mixer/q_proj/dot_general", "fusion()",
     "mixer projections", "forward"),
    ("jit(train_step)/jvp(LinearMoELM)/layers/block_0/mixer/attn", 'custom_call_target="__cudnn$fmha"',
     "mixer kernels", "forward"),
    ("jit(train_step)/jvp(LinearMoELM)/layers/block_0/mixer/sigmoid", "logistic()",
     "mixer elementwise", "forward"),
    ("jit(train_step)/jvp(LinearMoELM)/lm_head/dot_general", "fusion()", "embedding, head, loss",
     "forward"),
    ("jit(train_step)/transpose(jvp())/mul", "multiply()", "embedding, head, loss", "backward"),
    ("jit(train_step)/jit(_where)/select_n", "select()", "optimizer, grad norm, update", "forward"),
])
def test_part_and_phase(op_name, text, part, phase):
  assert ts.part(op_name, text) == part
  assert ts.phase(op_name) == phase


def test_hlo_ops_reads_names_and_stacks():
  text = ('  %fusion.3 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%c, '
          'metadata={op_name="jit(f)/moe/mul" source_file="x.py"}\n'
          '  ROOT add.1 = f32[4]{0} add(%a, %b)\n')
  ops = ts.hlo_ops(text)
  assert ops["fusion.3"][0] == "jit(f)/moe/mul"
  assert ops["add.1"][0] == "" and "add(" in ops["add.1"][1]


def test_summary_of_a_cpu_trace(tmp_path):
  """Every op of a traced CPU step is found in the compiled text and lands in one part."""
  def f(x):
    with jax.named_scope("LinearMoELM"), jax.named_scope("moe"):
      return jnp.sum(jnp.tanh(x @ x))
  compiled = jax.jit(f).lower(jnp.ones((64, 64))).compile()
  x = jnp.ones((64, 64))
  jax.block_until_ready(compiled(x))
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(compiled(x))
  summary = ts.summarize_trace(str(tmp_path), compiled.as_text())
  assert summary["device_ms"] > 0
  parts = summary["by_part"]
  assert sum(sum(p.values()) for p in parts.values()) == pytest.approx(summary["device_ms"])
  assert set(parts) <= {"MoE grouped matmuls", "MoE routing, sort, gather"}, parts
