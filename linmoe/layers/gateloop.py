"""GateLoop (Katsch, 2023, "GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling"),
real-valued form.

Data-controlled state transition per key channel: a_t = sigmoid(W_a x_t + b_a) (the magnitude
activation of GateLoop's complex a_t; the real form drops the phase):
S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, with plain linear q, k, v projections. As in
GateLoop's language model, the per-head normalized output is gated by SiLU(W_g x) and projected back.
"""
import jax
import jax.numpy as jnp

from linmoe.layers.common import head_projection
from linmoe.layers.lsm import LSMLayer


class GateLoop(LSMLayer):
  family = "gla"
  output_gate = "silu"

  def features(self, x, segment_ids):
    q, k, v = self.qkv(x)
    transition = head_projection(self.cfg, "a_proj", use_bias=True)(x)
    return q, k, v, jax.nn.log_sigmoid(transition.astype(jnp.float32))
