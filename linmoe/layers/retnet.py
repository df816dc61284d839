"""RetNet retention (Sun et al., 2023): fixed per-head decay gamma_h = 1 - 2^(-5-h).

q and k carry rotary positions (the real form of RetNet's xPos rotation); the per-head normalized
output (GroupNorm in the paper) is gated by swish(W_g x).
"""
import jax.numpy as jnp

from linmoe.layers.common import rotary
from linmoe.layers.lsm import LSMLayer, per_head_log_decay


def retnet_log_decay(n_heads: int) -> jnp.ndarray:
  """log(1 - 2^(-5-h)) for h = 0..n_heads-1: [n_heads]."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(n_heads, dtype=jnp.float32))))


class Retention(LSMLayer):
  family = "simple_gla"
  output_gate = "silu"

  def features(self, x, segment_ids):
    q, k, v = self.qkv(x)
    theta, offset = self.cfg.rope_theta, self.position_offset(x.shape[1])
    return rotary(q, theta, offset), rotary(k, theta, offset), v, per_head_log_decay(
        retnet_log_decay(self.cfg.n_heads), x)
