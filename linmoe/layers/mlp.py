"""Dense SwiGLU feed-forward block."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.layers.common import compute_dtype


class SwiGLU(nn.Module):
  """y = W_down (silu(W_gate x) * W_up x); [..., d_model] -> [..., d_model]."""
  cfg: ModelConfig
  d_ff: int = 0  # hidden width; 0 = model.moe.d_ff

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=compute_dtype(self.cfg), name=name)
    d_ff = self.d_ff or self.cfg.moe.d_ff
    h = jax.nn.silu(dense(d_ff, "gate")(x)) * dense(d_ff, "up")(x)
    return dense(self.cfg.d_model, "down")(h)
