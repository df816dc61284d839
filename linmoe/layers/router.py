"""MoE routers, their auxiliary losses, and the bookkeeping of routed slots.

softmax: probabilities over experts, then top-k (Mixtral, Qwen2-MoE), optionally renormalized.
sigmoid: independent sigmoid scores, top-k, weights renormalized (DeepSeek-V3 style).
A token's k choices are its slots; slot s = token * k + j. Dispatch sorts slots by expert
(`sort_slots`) and combines their results with the routing weights (`combine`).
"""
import functools
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


class SortedSlots(NamedTuple):
  """The [tokens, k] slots sorted by expert (stable: token order within an expert)."""
  order: jnp.ndarray  # [slots] slot index at each sorted position
  group_sizes: jnp.ndarray  # [experts] int32 slots per expert
  rank: jnp.ndarray  # [slots] rank of each sorted slot within its expert's group
  experts: jnp.ndarray  # [slots] expert of each sorted slot
  inverse: jnp.ndarray  # [slots] sorted position of each slot


def sort_slots(experts: jnp.ndarray, num_experts: int) -> SortedSlots:
  """experts [tokens, k] int32 -> the slots sorted by expert, without a [slots, experts] one-hot."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(group_sizes) - group_sizes
  sorted_experts = flat[order]
  rank = jnp.arange(flat.size) - starts[sorted_experts]
  return SortedSlots(order, group_sizes, rank, sorted_experts, jnp.argsort(order))


def capacity(slots: int, num_experts: int, factor: float) -> int:
  """Slots each expert takes in capacity mode: ceil(factor * slots / experts), at least 1."""
  return max(1, int(-(-factor * slots // num_experts)))


def combine(ys: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """ys [tokens * k, d] in slot order, weights [tokens, k] -> [tokens, d] weighted sums in ys's dtype."""
  ys = ys.reshape(*weights.shape, ys.shape[-1])
  return jnp.sum(ys * weights[..., None].astype(ys.dtype), axis=1)


def _gather(x: jnp.ndarray, index: jnp.ndarray, valid: jnp.ndarray | None) -> jnp.ndarray:
  rows = x[index]
  return rows if valid is None else jnp.where(valid[:, None], rows, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def move_rows(x: jnp.ndarray, index: jnp.ndarray, valid: jnp.ndarray | None, back: jnp.ndarray,
              back_valid: jnp.ndarray | None, repeat: int = 1) -> jnp.ndarray:
  """Rows of x, each repeated `repeat` times, moved by a one-to-one map; its gradient is a gather too.

  out[i] = x[index[i] // repeat] where valid[i] (None: all), else 0. (back, back_valid) is the inverse
  map: repeated row j went to out[back[j]] where back_valid[j], else nowhere. Autodiff of a plain
  gather would scatter-add the gradient (atomics on GPU); this gathers it.

  Args:
    x: [rows, d].
    index, valid: [out rows] int32, bool or None.
    back, back_valid: [rows * repeat] int32, bool or None.
    repeat: copies of each row of x (top_k when x holds tokens and out their slots).

  Returns:
    [out rows, d] in x's dtype.
  """
  return _gather(x, index // repeat if repeat > 1 else index, valid)


def _move_rows_fwd(x, index, valid, back, back_valid, repeat):
  return move_rows(x, index, valid, back, back_valid, repeat), (back, back_valid, x.shape[0])


def _move_rows_bwd(repeat, residuals, g):
  back, back_valid, num_rows = residuals
  dx = _gather(g, back, back_valid)  # [rows * repeat, d]
  if repeat > 1:
    dx = jnp.sum(dx.reshape(num_rows, repeat, -1).astype(jnp.float32), axis=1).astype(g.dtype)
  return dx, None, None, None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)
