"""TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States").

The hidden state is the weight W [head_dim, head_dim] of a linear inner model, trained while reading: each
token takes one gradient step of size eta_t on the self-supervised loss 1/2 |W^T k_t - v_t|^2 and the
output applies the updated model to the test view, o_t = W_t^T q_t. With unit-norm keys that step is the
delta rule with beta = eta_t: W_t = (I - eta_t k_t k_t^T) W_{t-1} + eta_t k_t v_t^T.
Kept from the paper's TTT-Linear layer: the three views (q and k from one shared projection, each through
its own causal convolution without activation; v its own projection), the data-dependent learning rate
eta_t = sigmoid(w_h . x_t + b_h) per head (base rate 1), the post-normalisation of the output and its gate
GELU(W_g x).
Simplified: one online step per token (the paper's mini-batch of 16 tokens takes its gradients at the
mini-batch's start weights, and its learnable per-position rates with it); no inner LayerNorm nor residual
(f(x) = W^T x, not x + LN(W^T x)); q and k L2-normalised, which replaces the eta / head_dim scaling; the
initial weights are zero, not learned; the post-norm is a per-head RMSNorm, not a LayerNorm over d_model.
"""
from linmoe.layers.common import head_projection
from linmoe.layers.delta_common import l2_normalize, sigmoid_gate
from linmoe.layers.lsm import LSMLayer


class TTTLinear(LSMLayer):
  family = "delta_rule"
  output_gate = "gelu"

  def features(self, x, segment_ids):
    qk = head_projection(self.cfg, "qk_proj")(x)
    q, k = (l2_normalize(self.short_conv(qk, segment_ids, f"{n}_conv", activation=False)) for n in "qk")
    v = head_projection(self.cfg, "v_proj")(x)
    return q, k, v, sigmoid_gate(self, x, "lr_proj", use_bias=True), None
