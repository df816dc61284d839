"""Gated Slot Attention (Zhang et al., 2024, "Gated Slot Attention for Efficient Linear-Time Sequence
Modeling").

Per head, m = 64 memory slots with a forget gate per slot alpha_t = sigmoid(W_a x_t)^(1/8) in (0, 1)^m;
a token writes (1 - alpha_t) of itself into each slot:
  K_t = diag(alpha_t) K_{t-1} + (1 - alpha_t) k_t^T      (slot keys,   [m, dk])
  V_t = diag(alpha_t) V_{t-1} + (1 - alpha_t) v_t^T      (slot values, [m, dv])
  o_t = V_t^T softmax(K_t q_t)
with q, k, v = SiLU of their projections and both readouts unscaled. o goes through SiLU, the per-head
RMSNorm (GSA normalizes the full width at once) and o_proj.

Two passes of the recurrence ops, each with its own decode state. The second pass is GLA with key axis
= slots: query softmax(K_t q_t), key 1 - alpha_t, log decay log alpha_t. The first pass decays K_t along
the slots but reads it out along dk, which GLA (decay and readout on the same axis) cannot express in
one head; it runs as simple GLA with one head per (head, slot): key k_t, value 1 - alpha_{t,i} (width
1), scalar decay alpha_{t,i}. Exact, but its q . k work is m times that of a dedicated op.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.common import head_projection
from linmoe.layers.feature_maps import unit_scale
from linmoe.layers.lsm import LSMLayer

NUM_SLOTS = 64
GATE_LOGIT_NORMALIZER = 8.0


def per_slot_heads(q: jnp.ndarray, k: jnp.ndarray, written: jnp.ndarray,
                   log_forget: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
  """The first pass as simple-GLA inputs with one head per (head, slot).

  Args:
    q, k: [batch, seq, heads, dk].
    written: 1 - alpha [batch, seq, heads, slots].
    log_forget: log alpha [batch, seq, heads, slots].
  Returns:
    q, k [batch, seq, heads * slots, dk], v [batch, seq, heads * slots, 1], g [batch, seq, heads * slots].
  """
  batch, seq, heads, slots = log_forget.shape
  flat = (batch, seq, heads * slots)

  def per_slot(t):  # [B, T, H, dk] -> [B, T, H * slots, dk], the same for every slot
    return jnp.broadcast_to(t[:, :, :, None], (batch, seq, heads, slots, t.shape[-1])).reshape(*flat, -1)

  return per_slot(q), per_slot(k), written.reshape(*flat, 1), log_forget.reshape(flat)


class GatedSlotAttention(LSMLayer):
  family = "gla"

  @nn.compact
  def __call__(self, x, segment_ids=None):
    cfg = self.cfg
    q, k, v = (jax.nn.silu(t) for t in self.qkv(x))
    gate_logits = head_projection(cfg, "f_proj", NUM_SLOTS)(x).astype(jnp.float32)
    log_forget = jax.nn.log_sigmoid(gate_logits) / GATE_LOGIT_NORMALIZER  # [B, T, H, slots]
    written = -jnp.expm1(log_forget)  # 1 - alpha
    scores = self.recurrence(per_slot_heads(unit_scale(q), k, written, log_forget), segment_ids,
                             family="simple_gla", name="slot_keys")  # K_t q_t: [B, T, H * slots, 1]
    weights = jax.nn.softmax(scores.reshape(log_forget.shape), axis=-1)  # over slots
    o = self.recurrence((unit_scale(weights), written, v, log_forget), segment_ids, name="slot_values")
    return self.output(jax.nn.silu(o), x)
