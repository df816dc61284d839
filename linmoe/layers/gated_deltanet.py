"""Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

The delta rule with Mamba2's decay: S_t = (I - beta_t k_t k_t^T)(alpha_t S_{t-1}) + beta_t k_t v_t^T,
o_t = S_t^T q_t, with log alpha_t = -exp(A_log) softplus(W_a x_t + dt_bias) per head and DeltaNet's features
(short convolutions with SiLU, L2-normalised q and k, beta_t = sigmoid(W_b x_t)). The per-head RMS-normalised
output is gated by SiLU(W_g x). Initialisation is Mamba2's (mamba2.py): dt log-uniform in [1e-3, 1e-1];
A ~ U(1, 16), where the paper's code draws A ~ U(0, 16).
"""
import jax
import jax.numpy as jnp

from linmoe.layers.delta_common import conv_qkv, head_scalars, sigmoid_gate
from linmoe.layers.lsm import LSMLayer
from linmoe.layers.mamba2 import a_log_init, dt_bias_init
from linmoe.parallel.rules import logical


class GatedDeltaNet(LSMLayer):
  family = "delta_rule"
  output_gate = "silu"

  def features(self, x, segment_ids):
    q, k, v = conv_qkv(self, x, segment_ids)
    heads = self.cfg.n_heads
    dt = jax.nn.softplus(head_scalars(self.cfg, "a_proj")(x).astype(jnp.float32)
                         + self.param("dt_bias", logical(dt_bias_init, "heads"), (heads,)))
    log_decay = -jnp.exp(self.param("A_log", logical(a_log_init, "heads"), (heads,))) * dt
    return q, k, v, sigmoid_gate(self, x), log_decay
