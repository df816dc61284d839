"""Pieces shared by the delta-rule family layers (DeltaNet, Gated DeltaNet, TTT, Titans, RWKV7).

DeltaNet's feature path (Yang et al. 2024, kept by Gated DeltaNet and Titans): q, k, v projections, each
through its own causal short convolution and SiLU, then q and k L2-normalised per head, so that the write
strength beta = sigmoid(W_b x) in (0, 1) keeps beta |k|^2 in the rule's stable range.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig
from linmoe.layers.common import compute_dtype
from linmoe.layers.lsm import LSMLayer
from linmoe.parallel.rules import dense_init, logical

L2_NORM_EPS = 1e-6


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / sqrt(|x|^2 + eps) over the last axis, computed in fp32: [..., dim] -> same shape and dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + L2_NORM_EPS)).astype(x.dtype)


def head_scalars(cfg: ModelConfig, name: str, use_bias: bool = False,
                 bias_init=nn.initializers.zeros) -> nn.DenseGeneral:
  """One value per head and token: [batch, seq, d_model] -> [batch, seq, heads]."""
  return nn.DenseGeneral(cfg.n_heads, use_bias=use_bias, kernel_init=dense_init("embed", "heads"),
                         bias_init=logical(bias_init, "heads"), dtype=compute_dtype(cfg),
                         name=name)


def conv_qkv(layer: LSMLayer, x: jnp.ndarray,
             segment_ids: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """DeltaNet's q, k, v: [batch, seq, d_model] -> 3 x [batch, seq, heads, head_dim], q and k unit norm
  (the convolutions read no other document of segment_ids [batch, seq] | None)."""
  q, k, v = (layer.short_conv(t, segment_ids, f"{n}_conv") for n, t in zip("qkv", layer.qkv(x)))
  return l2_normalize(q), l2_normalize(k), v


def sigmoid_gate(layer: LSMLayer, x: jnp.ndarray, name: str = "b_proj", use_bias: bool = False,
                 bias_init=nn.initializers.zeros) -> jnp.ndarray:
  """sigmoid(W x (+ b)) per head, e.g. DeltaNet's beta: [batch, seq, d_model] -> [batch, seq, heads] fp32."""
  logits = head_scalars(layer.cfg, name, use_bias, bias_init)(x)
  return jax.nn.sigmoid(logits.astype(jnp.float32))
