"""Dense SwiGLU feed-forward block."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.layers.common import compute_dtype
from linmoe.parallel.rules import dense_init


class SwiGLU(nn.Module):
  """y = W_down (silu(W_gate x) * W_up x); [..., d_model] -> [..., d_model]."""
  cfg: ModelConfig
  d_ff: int = 0  # hidden width; 0 = model.moe.d_ff

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = lambda n, names, name: nn.Dense(n, use_bias=False, dtype=compute_dtype(self.cfg),
                                            kernel_init=dense_init(*names), name=name)
    d_ff = self.d_ff or self.cfg.moe.d_ff
    column, row = ("embed", "mlp"), ("mlp", "embed")  # column- then row-parallel over tensor
    h = jax.nn.silu(dense(d_ff, column, "gate")(x)) * dense(d_ff, column, "up")(x)
    return dense(self.cfg.d_model, row, "down")(h)
