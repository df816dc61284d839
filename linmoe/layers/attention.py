"""Causal softmax attention with rotary positions (the `N` blocks of a hybrid pattern)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.layers.common import head_projection, output_projection, rotary


class CausalAttention(nn.Module):
  """Multi-head causal attention; [batch, seq, d_model] -> [batch, seq, d_model]."""
  cfg: ModelConfig
  layer_idx: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    q = rotary(head_projection(cfg, "q_proj")(x), cfg.rope_theta)  # [B, T, H, Dh]
    k = rotary(head_projection(cfg, "k_proj")(x), cfg.rope_theta)
    v = head_projection(cfg, "v_proj")(x)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return output_projection(cfg)(o)
