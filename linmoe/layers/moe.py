"""Mixture-of-Experts feed-forward: softmax top-k router, dropless dispatch, SwiGLU experts.

Tokens are sorted by expert, the three expert matmuls run as grouped matmuls over the ragged groups
(`jax.lax.ragged_dot`), and the results are unsorted and combined with the router weights.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.layers.common import compute_dtype


def router_losses(logits: jnp.ndarray, probs: jnp.ndarray, experts: jnp.ndarray) -> dict:
  """Load-balancing loss (Switch/GShard: E * sum_e f_e p_e, 1.0 when balanced) and router z-loss.

  Args:
    logits, probs: [tokens, experts] float32.
    experts: [tokens, k] int32, the chosen experts.
  """
  num_experts = logits.shape[-1]
  counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
  load = counts / experts.size  # f_e: share of routed slots per expert
  balance = num_experts * jnp.sum(load * jnp.mean(probs, axis=0))
  z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  return {"moe_lb_loss": balance, "moe_z_loss": z_loss, "moe_max_load": jnp.max(load) * num_experts}


class MoE(nn.Module):
  """[batch, seq, d_model] -> ([batch, seq, d_model], aux losses)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    cfg, moe = self.cfg, self.cfg.moe
    dtype = compute_dtype(cfg)
    tokens = x.reshape(-1, cfg.d_model)  # [N, D]
    logits = nn.Dense(moe.num_experts, use_bias=False, dtype=jnp.float32, name="router")(
        tokens.astype(jnp.float32))  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, moe.top_k)  # [N, k]
    if moe.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)

    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1,
                                            out_axis=2, batch_axis=(0,))
    w_gate = self.param("w_gate", init, (moe.num_experts, cfg.d_model, moe.d_ff)).astype(dtype)
    w_up = self.param("w_up", init, (moe.num_experts, cfg.d_model, moe.d_ff)).astype(dtype)
    w_down = self.param("w_down", init, (moe.num_experts, moe.d_ff, cfg.d_model)).astype(dtype)

    flat_experts = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=moe.num_experts).astype(jnp.int32)
    xs = tokens[order // moe.top_k].astype(dtype)  # [N*k, D], sorted by expert
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(
        xs, w_up, group_sizes)
    ys = jax.lax.ragged_dot(h, w_down, group_sizes)  # [N*k, D]
    y = ys[jnp.argsort(order)].reshape(-1, moe.top_k, cfg.d_model)
    out = jnp.sum(y * weights[..., None].astype(dtype), axis=1)
    return out.reshape(x.shape), router_losses(logits, probs, experts)
