"""Mixture-of-Experts feed-forward: router, dispatch to SwiGLU experts, combine, shared experts.

Dispatch modes (`model.moe.dispatch`):
- dropless: token slots are sorted by expert and the three expert matmuls run as grouped matmuls over
  the ragged groups (`linmoe.kernels.grouped_matmul`); results are unsorted and combined.
- capacity: each expert takes at most ceil(factor * slots / experts) slots (factor
  `capacity_factor_train` in training, `capacity_factor_eval` otherwise), in token order; slots past
  capacity are dropped (they contribute zero) and their share is reported as `moe_dropped_frac`.
Neither mode builds a [tokens, experts] one-hot: both sort the slots once and unsort once.
When the ambient mesh's "expert" axis is larger than 1, the experts are split over it and the slots
travel by all_to_all (`linmoe.parallel.expert`), with the same results.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe import kernels
from linmoe.config import ModelConfig
from linmoe.layers.common import compute_dtype
from linmoe.layers.mlp import SwiGLU
from linmoe.layers.router import capacity, combine, route, router_losses, sort_slots
from linmoe.parallel import expert


def grouped_swiglu(xs: jnp.ndarray, weights: tuple, group_sizes: jnp.ndarray, impl: str) -> jnp.ndarray:
  """SwiGLU experts on rows xs [rows, D] sorted by expert; weights (gate, up [E, D, F], down [E, F, D]);
  group_sizes [E]. Rows past the sum of the group sizes give zeros."""
  w_gate, w_up, w_down = weights
  gmm = lambda a, w: kernels.grouped_matmul(a, w, group_sizes, impl=impl)
  return gmm(jax.nn.silu(gmm(xs, w_gate)) * gmm(xs, w_up), w_down)


class MoE(nn.Module):
  """[batch, seq, d_model] -> ([batch, seq, d_model], aux losses and load metrics)."""
  cfg: ModelConfig
  training: bool = True  # selects the capacity factor

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    cfg, moe = self.cfg, self.cfg.moe
    dtype = compute_dtype(cfg)
    tokens = x.reshape(-1, cfg.d_model)  # [N, D]
    logits = nn.Dense(moe.num_experts, use_bias=False, dtype=jnp.float32, name="router")(
        tokens.astype(jnp.float32))  # [N, E]
    routing = route(logits, moe.router, moe.top_k, moe.renormalize)
    aux = router_losses(logits, routing)

    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1,
                                            out_axis=2, batch_axis=(0,))
    shape_in, shape_out = (moe.num_experts, cfg.d_model, moe.d_ff), (moe.num_experts, moe.d_ff,
                                                                     cfg.d_model)
    weights = tuple(self.param(n, init, s).astype(dtype) for n, s in (
        ("w_gate", shape_in), ("w_up", shape_in), ("w_down", shape_out)))

    tokens = tokens.astype(dtype)
    factor = moe.capacity_factor_train if self.training else moe.capacity_factor_eval
    cap = capacity(routing.experts.size, moe.num_experts, factor) if moe.dispatch == "capacity" else None
    if expert.expert_parallel():
      ffn = functools.partial(grouped_swiglu, impl=moe.gmm_impl)
      out, dropped = expert.expert_parallel_moe(tokens, routing.experts, routing.weights, weights, ffn,
                                                cap)
    else:
      slots = sort_slots(routing.experts, moe.num_experts)
      xs = tokens[slots.order // moe.top_k]  # [N*k, D], sorted by expert
      if cap is None:
        ys, dropped = grouped_swiglu(xs, weights, slots.group_sizes, moe.gmm_impl), None
      else:
        ys, dropped = self._capacity(xs, weights, slots, cap)
      out = combine(ys[jnp.argsort(slots.order)], routing.weights)
    if cap is not None:
      aux["moe_dropped_frac"] = dropped
    if moe.num_shared_experts:
      out = out + self._shared(tokens)
    return out.reshape(x.shape), aux

  def _capacity(self, xs, weights, slots, cap):
    """SwiGLU over an [experts, capacity, D] buffer; xs [slots, D] sorted by expert; slots past an
    expert's capacity are dropped. Returns ([slots, D] sorted, the fraction dropped)."""
    keep = slots.rank < cap
    row = jnp.where(keep, slots.rank, cap)  # dropped slots go to a scratch row that is cut off
    buffer = jnp.zeros((self.cfg.moe.num_experts, cap + 1, xs.shape[1]), xs.dtype)
    buffer = buffer.at[slots.experts, row].set(xs)[:, :cap]
    w_gate, w_up, w_down = weights
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, w_gate)) * jnp.einsum(
        "ecd,edf->ecf", buffer, w_up)
    out = jnp.einsum("ecf,efd->ecd", h, w_down)
    ys = jnp.where(keep[:, None], out[slots.experts, jnp.minimum(row, cap - 1)], 0)
    return ys, 1.0 - jnp.mean(keep.astype(jnp.float32))

  def _shared(self, tokens):
    """Shared experts, applied to every token: one SwiGLU of width num_shared * shared_d_ff, with a
    sigmoid gate per token when `shared_expert_gate` (Qwen2-MoE) or none (DeepSeek)."""
    moe = self.cfg.moe
    y = SwiGLU(self.cfg, d_ff=moe.num_shared_experts * moe.shared_d_ff, name="shared")(tokens)
    if moe.shared_expert_gate:
      gate = nn.Dense(1, use_bias=False, dtype=tokens.dtype, name="shared_gate")(tokens)
      y = y * jax.nn.sigmoid(gate)
    return y
