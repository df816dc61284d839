"""Mixture-of-Experts feed-forward: router, dispatch to SwiGLU experts, combine, shared experts.

Dispatch modes (`model.moe.dispatch`):
- dropless: token slots are sorted by expert and the three expert matmuls run as grouped matmuls over
  the ragged groups (`linmoe.kernels.grouped_matmul`); results are unsorted and combined.
- capacity: each expert takes at most ceil(factor * slots / experts) slots (factor
  `capacity_factor_train` in training, `capacity_factor_eval` otherwise), in token order; slots past
  capacity are dropped (they contribute zero) and their share is reported as `moe_dropped_frac`.
Neither mode builds a [tokens, experts] one-hot: both sort the slots once and unsort once.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe import kernels
from linmoe.config import ModelConfig
from linmoe.layers.common import compute_dtype
from linmoe.layers.mlp import SwiGLU
from linmoe.layers.router import route, router_losses
from linmoe.parallel.rules import dense_init, logical


def sort_slots(experts: jnp.ndarray, num_experts: int):
  """Sorts the [tokens, k] slots by expert; returns (order [slots], group sizes [experts],
  rank of each sorted slot within its expert's group [slots])."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(group_sizes) - group_sizes
  sorted_experts = flat[order]
  rank = jnp.arange(flat.size) - starts[sorted_experts]
  return order, group_sizes, rank, sorted_experts


def capacity(slots: int, num_experts: int, factor: float) -> int:
  return max(1, int(-(-factor * slots // num_experts)))


class MoE(nn.Module):
  """[batch, seq, d_model] -> ([batch, seq, d_model], aux losses and load metrics)."""
  cfg: ModelConfig
  training: bool = True  # selects the capacity factor

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    cfg, moe = self.cfg, self.cfg.moe
    dtype = compute_dtype(cfg)
    tokens = x.reshape(-1, cfg.d_model)  # [N, D]
    logits = nn.Dense(moe.num_experts, use_bias=False, dtype=jnp.float32,
                      kernel_init=dense_init("embed", "router"), name="router")(
        tokens.astype(jnp.float32))  # [N, E]
    routing = route(logits, moe.router, moe.top_k, moe.renormalize)
    aux = router_losses(logits, routing)

    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1,
                                            out_axis=2, batch_axis=(0,))
    column, row = logical(init, "experts", "embed", "mlp"), logical(init, "experts", "mlp", "embed")
    shape_in, shape_out = (moe.num_experts, cfg.d_model, moe.d_ff), (moe.num_experts, moe.d_ff,
                                                                     cfg.d_model)
    weights = tuple(self.param(n, i, s).astype(dtype) for n, i, s in (
        ("w_gate", column, shape_in), ("w_up", column, shape_in), ("w_down", row, shape_out)))

    order, group_sizes, rank, sorted_experts = sort_slots(routing.experts, moe.num_experts)
    xs = tokens[order // moe.top_k].astype(dtype)  # [N*k, D], sorted by expert
    if moe.dispatch == "dropless":
      ys = self._dropless(xs, weights, group_sizes)
    else:
      ys, dropped = self._capacity(xs, weights, rank, sorted_experts)
      aux["moe_dropped_frac"] = dropped
    y = ys[jnp.argsort(order)].reshape(-1, moe.top_k, cfg.d_model)
    out = jnp.sum(y * routing.weights[..., None].astype(dtype), axis=1)
    if moe.num_shared_experts:
      out = out + self._shared(tokens.astype(dtype))
    return out.reshape(x.shape), aux

  def _dropless(self, xs, weights, group_sizes):
    """Grouped SwiGLU over ragged expert groups; xs [slots, D] sorted by expert."""
    w_gate, w_up, w_down = weights
    gmm = lambda a, w: kernels.grouped_matmul(a, w, group_sizes, impl=self.cfg.moe.gmm_impl)
    return gmm(jax.nn.silu(gmm(xs, w_gate)) * gmm(xs, w_up), w_down)

  def _capacity(self, xs, weights, rank, sorted_experts):
    """SwiGLU over an [experts, capacity, D] buffer; slots past an expert's capacity are dropped."""
    moe = self.cfg.moe
    factor = moe.capacity_factor_train if self.training else moe.capacity_factor_eval
    cap = capacity(xs.shape[0], moe.num_experts, factor)
    keep = rank < cap
    slot = jnp.where(keep, rank, cap)  # dropped slots go to a scratch row that is cut off
    buffer = jnp.zeros((moe.num_experts, cap + 1, xs.shape[1]), xs.dtype)
    buffer = buffer.at[sorted_experts, slot].set(xs)[:, :cap]
    w_gate, w_up, w_down = weights
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, w_gate)) * jnp.einsum(
        "ecd,edf->ecf", buffer, w_up)
    out = jnp.einsum("ecf,efd->ecd", h, w_down)
    ys = jnp.where(keep[:, None], out[sorted_experts, jnp.minimum(slot, cap - 1)], 0)
    return ys, 1.0 - jnp.mean(keep.astype(jnp.float32))

  def _shared(self, tokens):
    """Shared experts, applied to every token: one SwiGLU of width num_shared * shared_d_ff, with a
    sigmoid gate per token when `shared_expert_gate` (Qwen2-MoE) or none (DeepSeek)."""
    moe = self.cfg.moe
    y = SwiGLU(self.cfg, d_ff=moe.num_shared_experts * moe.shared_d_ff, name="shared")(tokens)
    if moe.shared_expert_gate:
      gate = nn.Dense(1, use_bias=False, dtype=tokens.dtype, kernel_init=dense_init("embed", None),
                      name="shared_gate")(tokens)
      y = y * jax.nn.sigmoid(gate)
    return y
