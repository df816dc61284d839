"""Titans' neural long-term memory, linear form (Behrouz et al. 2025, "Titans: Learning to Memorize at Test
Time"), used as a sequence-mixing layer (the paper's memory-as-a-layer variant, without its attention).

A linear memory M is trained online on 1/2 |M^T k_t - v_t|^2 with momentum ("surprise") and forgetting:
  S_t = eta_t S_{t-1} - theta_t grad(M_{t-1}),   M_t = (1 - alpha_t) M_{t-1} + S_t,   o_t = M_t^T q_t,
computed exactly per token (linmoe/kernels/titans.py; the paper's chunk-wise gradients, taken at the
chunk's start memory, are an approximation that only deep memories need). As in the paper: q, k, v through
short convolutions with SiLU, q and k L2-normalised (delta_common.py), data-dependent gates per head and
token theta_t = sigmoid(W_theta x), eta_t = sigmoid(W_eta x), alpha_t = sigmoid(W_alpha x), and the
per-head normalised output gated by a linear layer before the output projection (SiLU, as in Gated
DeltaNet, whose block Titans follows).
Chosen here (the paper gives none): the forget gate's bias starts at FORGET_BIAS_INIT (alpha ~ 0.02, a
memory of ~50 tokens), the other biases at 0 (theta = eta = 1/2).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.delta_common import conv_qkv, head_scalars, sigmoid_gate
from linmoe.layers.lsm import LSMLayer

FORGET_BIAS_INIT = -4.0


class Titans(LSMLayer):
  family = "titans"
  output_gate = "silu"

  def features(self, x, segment_ids):
    q, k, v = conv_qkv(self, x, segment_ids)
    theta = sigmoid_gate(self, x, "lr_proj", use_bias=True)
    forget = head_scalars(self.cfg, "forget_proj", True, nn.initializers.constant(FORGET_BIAS_INIT))(x)
    momentum = head_scalars(self.cfg, "momentum_proj", use_bias=True)(x)
    log_keep, log_eta = (jax.nn.log_sigmoid(z.astype(jnp.float32)) for z in (-forget, momentum))
    return q, k, v, theta, log_keep, log_eta
