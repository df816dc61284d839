"""MoE routers and their auxiliary losses.

softmax: probabilities over experts, then top-k (Mixtral, Qwen2-MoE), optionally renormalized.
sigmoid: independent sigmoid scores, top-k, weights renormalized (DeepSeek-V3 style).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

ROUTERS = ("softmax", "sigmoid")


class Routing(NamedTuple):
  weights: jnp.ndarray  # [tokens, k] float32 combine weights
  experts: jnp.ndarray  # [tokens, k] int32 chosen experts
  probs: jnp.ndarray  # [tokens, experts] float32 routing distribution (for the balance loss)


def route(logits: jnp.ndarray, kind: str, top_k: int, renormalize: bool) -> Routing:
  """logits [tokens, experts] float32 -> the top-k experts of each token and their weights."""
  if kind == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  elif kind == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  else:
    raise ValueError(f"router must be one of {ROUTERS}, got {kind!r}")
  weights, experts = jax.lax.top_k(scores, top_k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(weights, experts.astype(jnp.int32), probs)


def expert_load(experts: jnp.ndarray, num_experts: int) -> jnp.ndarray:
  """Share of the routed slots each expert receives: [experts], sums to 1."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
  return counts / experts.size


def router_losses(logits: jnp.ndarray, routing: Routing) -> dict:
  """Load-balancing loss (Switch/GShard: E * sum_e f_e p_e, 1.0 when balanced), router z-loss, and the
  per-expert load [experts] with its maximum relative to a balanced share."""
  num_experts = logits.shape[-1]
  load = expert_load(routing.experts, num_experts)
  balance = num_experts * jnp.sum(load * jnp.mean(routing.probs, axis=0))
  z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  return {"moe_lb_loss": balance, "moe_z_loss": z_loss, "moe_max_load": jnp.max(load) * num_experts,
          "moe_expert_load": load}
