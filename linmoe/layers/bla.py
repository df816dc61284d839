"""Basic Linear Attention (Katharopoulos et al., 2020): no decay, feature map elu(x) + 1.

S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t); the output is RMS-normalized per head in place
of the original denominator (as TransNormer and Linear-MoE do), which keeps it stable over long inputs.
"""
import jax
import jax.numpy as jnp

from linmoe.layers.lsm import LSMLayer


def elu_plus_one(x: jnp.ndarray) -> jnp.ndarray:
  return jax.nn.elu(x) + 1.0


class BasicLinearAttention(LSMLayer):
  family = "simple_gla"

  def features(self, x, segment_ids):
    q, k, v = self.qkv(x)
    return elu_plus_one(q), elu_plus_one(k), v, None
