"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length").

The delta rule S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t: each token
overwrites the value stored under its key instead of adding to it. q, k, v come from short convolutions with
SiLU, q and k L2-normalised, beta_t = sigmoid(W_b x_t) per head (delta_common.py). The output is
RMS-normalised per head with no gate, flash-linear-attention's default for DeltaNet (use_gate=False).
"""
from linmoe.layers.delta_common import conv_qkv, sigmoid_gate
from linmoe.layers.lsm import LSMLayer


class DeltaNet(LSMLayer):
  family = "delta_rule"

  def features(self, x, segment_ids):
    q, k, v = conv_qkv(self, x, segment_ids)
    return q, k, v, sigmoid_gate(self, x), None
