"""Mixture-of-Experts feed-forward: router, dispatch to SwiGLU experts, combine, shared experts.

Dispatch modes (`model.moe.dispatch`):
- dropless: token slots are sorted by expert and the three expert matmuls run as grouped matmuls over
  the ragged groups (`linmoe.kernels.grouped_matmul`); results are unsorted and combined.
- capacity: each expert takes at most ceil(factor * slots / experts) slots (factor
  `capacity_factor_train` in training, `capacity_factor_eval` otherwise), in token order; slots past
  capacity are dropped (they contribute zero) and their share is reported as `moe_dropped_frac`.
Neither mode builds a [tokens, experts] one-hot: the slots are sorted once, and tokens reach their
slots and results come back by one row gather each way (`move_rows`, whose gradients are gathers too).
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
from linmoe.layers.router import capacity, combine, move_rows, route, router_losses, sort_slots
from linmoe.parallel import expert
from linmoe.parallel.rules import dense_init, logical


def swiglu_hidden(gate_up: jnp.ndarray) -> jnp.ndarray:
  """[..., 2F] (gate then up projections) -> [..., F] silu(gate) * up."""
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return jax.nn.silu(gate) * up


def grouped_swiglu(xs: jnp.ndarray, weights: tuple, group_sizes: jnp.ndarray, impl: str) -> jnp.ndarray:
  """SwiGLU experts on rows xs [rows, D] sorted by expert; weights (gate_up [E, D, 2F], down [E, F, D]);
  group_sizes [E]. Rows past the sum of the group sizes give zeros. Gate and up run as one grouped
  matmul with N = 2F (x read once, one input-gradient kernel)."""
  w_gate_up, w_down = weights
  gmm = lambda a, w: kernels.grouped_matmul(a, w, group_sizes, impl=impl)
  return gmm(swiglu_hidden(gmm(xs, w_gate_up)), w_down)


def gathered_swiglu(tokens: jnp.ndarray, experts: jnp.ndarray, weights: tuple) -> jnp.ndarray:
  """SwiGLU of each token through each of its k experts, with those experts' weights gathered per
  slot: tokens [N, D], experts [N, k] -> [N*k, D] in slot order. Exact like the grouped path; for a few
  tokens (decoding) it reads N*k expert matrices instead of every expert's and launches no grouped
  kernel, so `MoE` takes it when the slots are no more than the experts (GATHER_MAX_SLOTS_PER_EXPERT)."""
  w_gate_up, w_down = (w[experts] for w in weights)  # [N, k, D, 2F], [N, k, F, D]
  h = swiglu_hidden(jnp.einsum("nd,nkdf->nkf", tokens, w_gate_up))
  return jnp.einsum("nkf,nkfd->nkd", h, w_down).reshape(-1, tokens.shape[-1])


# Dropless slots per expert up to which `MoE` gathers weights per slot instead of sorting the slots.
GATHER_MAX_SLOTS_PER_EXPERT = 1


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
    shape_in, shape_out = (moe.num_experts, cfg.d_model, 2 * moe.d_ff), (moe.num_experts, moe.d_ff,
                                                                         cfg.d_model)
    # Gate and up stored side by side (no concatenation per call); in expert_param_dtype: in bf16 the
    # cast below is free (the optimizer keeps fp32 masters).
    param_dtype = jnp.dtype(moe.expert_param_dtype)
    weights = tuple(self.param(n, i, s, param_dtype).astype(dtype) for n, i, s in (
        ("w_gate_up", column, shape_in), ("w_down", row, shape_out)))

    tokens = tokens.astype(dtype)
    factor = moe.capacity_factor_train if self.training else moe.capacity_factor_eval
    cap = capacity(routing.experts.size, moe.num_experts, factor) if moe.dispatch == "capacity" else None
    if expert.expert_parallel():
      ffn = functools.partial(grouped_swiglu, impl=moe.gmm_impl)
      out, dropped = expert.expert_parallel_moe(tokens, routing.experts, routing.weights, weights, ffn,
                                                cap)
    elif cap is None and routing.experts.size <= GATHER_MAX_SLOTS_PER_EXPERT * moe.num_experts:
      out = combine(gathered_swiglu(tokens, routing.experts, weights), routing.weights)
    else:
      slots = sort_slots(routing.experts, moe.num_experts)
      if cap is None:
        xs = move_rows(tokens, slots.order, None, slots.inverse, None, moe.top_k)  # [N*k, D] sorted
        ys = grouped_swiglu(xs, weights, slots.group_sizes, moe.gmm_impl)
        ys, dropped = move_rows(ys, slots.inverse, None, slots.order, None), None  # slot order
      else:
        ys, dropped = self._capacity(tokens, weights, slots, cap)
      out = combine(ys, routing.weights)
    if cap is not None:
      aux["moe_dropped_frac"] = dropped
    if moe.num_shared_experts:
      out = out + self._shared(tokens)
    return out.reshape(x.shape), aux

  def _capacity(self, tokens, weights, slots, cap):
    """SwiGLU over an [experts, capacity, D] buffer: expert e takes its first `cap` slots in token
    order, the rest are dropped. tokens [N, D]. Returns ([N*k, D] in slot order, the fraction dropped)."""
    num_experts, num_slots = self.cfg.moe.num_experts, slots.order.shape[0]
    column = jnp.arange(cap)
    starts = jnp.cumsum(slots.group_sizes) - slots.group_sizes
    filled = (column[None, :] < slots.group_sizes[:, None]).reshape(-1)  # [E * cap]
    slot_of_row = slots.order[jnp.minimum(starts[:, None] + column, num_slots - 1).reshape(-1)]
    rank = slots.rank[slots.inverse]  # [N*k] rank of each slot within its expert, in slot order
    kept = rank < cap
    row_of_slot = slots.experts[slots.inverse] * cap + jnp.minimum(rank, cap - 1)
    buffer = move_rows(tokens, slot_of_row, filled, row_of_slot, kept, self.cfg.moe.top_k)
    buffer = buffer.reshape(num_experts, cap, -1)
    w_gate_up, w_down = weights
    h = swiglu_hidden(jnp.einsum("ecd,edf->ecf", buffer, w_gate_up))
    out = jnp.einsum("ecf,efd->ecd", h, w_down).reshape(num_experts * cap, -1)
    ys = move_rows(out, row_of_slot, kept, slot_of_row, filled)
    return ys, 1.0 - jnp.mean(kept.astype(jnp.float32))

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
