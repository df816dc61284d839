"""Gated Linear Attention (Yang et al., 2024): data-dependent decay per key channel.

alpha_t = sigmoid(W2 W1 x_t + b)^(1/16), i.e. log alpha_t = logsigmoid(W2 W1 x_t + b) / 16, with a
low-rank (16) gate projection; the per-head normalized output is gated by swish(W_r x).
"""
import flax.linen as nn
import jax

from linmoe.layers.common import compute_dtype, head_projection
from linmoe.layers.lsm import LSMLayer
from linmoe.parallel.rules import dense_init

GATE_RANK = 16
GATE_LOGIT_NORMALIZER = 16.0


class GatedLinearAttention(LSMLayer):
  family = "gla"
  output_gate = "silu"

  def features(self, x, segment_ids):
    q, k, v = self.qkv(x)
    low_rank = nn.Dense(GATE_RANK, use_bias=False, dtype=compute_dtype(self.cfg),
                        kernel_init=dense_init("embed", "lora"), name="gk_down")(x)
    gate_logits = head_projection(self.cfg, "gk_up", use_bias=True)(low_rank)
    g = jax.nn.log_sigmoid(gate_logits.astype("float32")) / GATE_LOGIT_NORMALIZER
    return q, k, v, g
