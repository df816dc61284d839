"""Model FLOPs of one training step, counted from the model's own shapes (for MFU).

What is counted, per token, forward (the backward is counted as twice the forward):
- every matmul weight: 2 * size (parameters of rank >= 2 except the embedding table, which is a
  lookup; MoE expert weights [experts, ...] scaled by top_k / experts; depthwise short-convolution
  kernels [width, channels] count 2 * width * channels, which is what they do);
- every recurrence op call, from the shapes it is called with (recorded by `jax.eval_shape`): the
  chunked algorithm with chunk C, heads H, key dim dk and value dim dv does, per token and head,
  2 * (C/2) * (dk + dv) for the causal intra-chunk scores and their values, 2 * dk * dv to read the
  state and 2 * dk * dv to update it; the delta rule adds its WY transform: 2 * (C/2) * dk for
  beta K K^T, (2/3) * C^2 for the triangular inverse, 2 * (C/2) * (dk + dv) for w and u, and
  2 * dk * dv for u - w S. Ops are counted as executed: Mixture-of-Memories runs each memory over
  every token (its router masks updates), so each memory counts in full;
- softmax attention: 2 * 2 * (T/2) * head_dim per token and head (causal Q K^T and P V).
Elementwise work (norms, gates, activations, softmax) is not counted.
"""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from linmoe.config import ModelConfig
from linmoe.layers import lsm as lsm_module
from linmoe.model import LinearMoELM

DELTA_FAMILIES = ("delta_rule", "dplr", "titans")


def matmul_flops_per_token(params, cfg: ModelConfig) -> float:
  """2 * (matmul weights one token passes through); params is the model's "params" tree."""
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(k, "key", "") for k in path]
    if leaf.ndim < 2 or "embed" in names:
      continue
    share = cfg.moe.top_k / cfg.moe.num_experts if names[-1] in ("w_gate_up", "w_down") else 1.0
    total += 2.0 * np.prod(leaf.shape) * share
  return total


def recurrence_flops_per_token(family: str, heads: int, dk: int, dv: int, chunk: int) -> float:
  """Forward FLOPs per token of one chunked recurrence op call (see the module docstring)."""
  per_head = 2 * (chunk / 2) * (dk + dv) + 4 * dk * dv
  if family in DELTA_FAMILIES:
    per_head += 2 * (chunk / 2) * dk + (2 / 3) * chunk ** 2 + 2 * (chunk / 2) * (dk + dv) + 2 * dk * dv
  return heads * per_head


@contextlib.contextmanager
def _recording_op_calls(calls: list):
  """Wraps every recurrence family's sequence op to record (family, q shape, v shape)."""
  saved = dict(lsm_module.FAMILIES)
  def recorder(name, family):
    def sequence(*inputs, **kwargs):
      calls.append((name, inputs[0].shape, inputs[2].shape))
      return family.sequence(*inputs, **kwargs)
    return dataclasses.replace(family, sequence=sequence)
  lsm_module.FAMILIES.update({n: recorder(n, f) for n, f in saved.items()})
  try:
    yield
  finally:
    lsm_module.FAMILIES.update(saved)


def step_flops(params, cfg: ModelConfig, batch: int, seq: int) -> dict:
  """Model FLOPs of one training step on [batch, seq] tokens: {"total", "matmul", "mixer"}.

  The op calls are recorded from an unrolled copy of the model (a scanned stack traces its unit once).
  """
  unrolled = LinearMoELM(dataclasses.replace(cfg, scan_layers=False, remat="none"))
  calls = []
  with _recording_op_calls(calls):
    jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros((batch, seq), jnp.int32))
  tokens = batch * seq
  mixer = sum(recurrence_flops_per_token(name, q[2], q[3], v[3], min(cfg.chunk_size, seq)) * tokens
              for name, q, v in calls)
  attention_blocks = cfg.layer_kinds.count("N")
  mixer += attention_blocks * 4 * (seq / 2) * cfg.d_model * tokens
  matmul = matmul_flops_per_token(params, cfg) * tokens
  return {"total": 3 * (matmul + mixer), "matmul": 3 * matmul, "mixer": 3 * mixer}
