"""Lightning Attention (Qin et al., 2024; TransNormerLLM and MiniMax-01 layers).

Fixed per-head decay from ALiBi-style slopes, weakened in deeper layers:
log a_h = -slope_h * (1 - layer / (n_layers - 1) + 1e-5). q, k, v go through SiLU; the per-head
normalized output is gated by sigmoid(W_g x).
"""
import math

import jax
import jax.numpy as jnp

from linmoe.layers.lsm import LSMLayer, per_head_log_decay


def alibi_slopes(n_heads: int) -> jnp.ndarray:
  """Geometric slopes 2^(-8(i+1)/n) for a power of two n; otherwise the nearest power's slopes
  interleaved with those of twice that power (ALiBi's rule). Returns [n_heads]."""
  def power_of_two(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  if math.log2(n_heads).is_integer():
    return jnp.asarray(power_of_two(n_heads))
  base = 2 ** math.floor(math.log2(n_heads))
  return jnp.asarray(power_of_two(base) + power_of_two(2 * base)[0::2][: n_heads - base])


class LightningAttention(LSMLayer):
  family = "simple_gla"
  output_gate = "sigmoid"

  def features(self, x, segment_ids):
    q, k, v = (jax.nn.silu(t) for t in self.qkv(x))
    depth = 1.0 - self.layer_idx / max(self.cfg.n_layers - 1, 1) + 1e-5
    return q, k, v, per_head_log_decay(-alibi_slopes(self.cfg.n_heads) * depth, x)
