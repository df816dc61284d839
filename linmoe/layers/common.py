"""Pieces shared by every mixer: dtypes, head projections, per-head norms and rotary positions."""
import flax.linen as nn
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.parallel.rules import dense_init, ones_init, zeros_init

EMBED_INIT_STD = 0.02


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  return jnp.dtype(cfg.compute_dtype)


def head_projection(cfg: ModelConfig, name: str, head_dim: int | None = None,
                    use_bias: bool = False) -> nn.DenseGeneral:
  """[batch, seq, d_model] -> [batch, seq, heads, head_dim]."""
  return nn.DenseGeneral((cfg.n_heads, head_dim or cfg.head_dim), use_bias=use_bias,
                         kernel_init=dense_init("embed", "heads", "head_dim"),
                         bias_init=zeros_init("heads", "head_dim"), dtype=compute_dtype(cfg), name=name)


def output_projection(cfg: ModelConfig, name: str = "o_proj") -> nn.DenseGeneral:
  """[batch, seq, heads, head_dim] -> [batch, seq, d_model]."""
  return nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False,
                         kernel_init=dense_init("heads", "head_dim", "embed"), dtype=compute_dtype(cfg),
                         name=name)


def rms_norm(cfg: ModelConfig, name: str) -> nn.RMSNorm:
  """RMSNorm over the last axis; on [batch, seq, heads, dim] it normalizes each head alone."""
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), scale_init=ones_init("norm"), name=name)


def rotary(x: jnp.ndarray, theta: float, offset: jnp.ndarray | int = 0) -> jnp.ndarray:
  """Rotary positions (rotate-half form) for positions offset .. offset + seq - 1.

  Args:
    x: [batch, seq, heads, dim], dim even.
    theta: rotary base.
    offset: position of the first token (a traced scalar when decoding).
  Returns:
    [batch, seq, heads, dim], same dtype.
  """
  dim = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
  positions = offset + jnp.arange(x.shape[1], dtype=jnp.float32)
  angles = positions[:, None] * freqs  # [seq, dim/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
