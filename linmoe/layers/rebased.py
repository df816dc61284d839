"""ReBased (Aksenov et al., 2024, "Linear Transformers with Learnable Kernel Functions are Better
In-Context Models").

A learnable quadratic kernel: phi(x) = (gamma * norm(x) + beta)^2, with norm a LayerNorm over the 16 dims
per head of the q, k projections and gamma, beta its learnable scale and shift (shared by q and k), so
phi(q) . phi(k) = ((gamma * norm(q) + beta) . (gamma * norm(k) + beta))^2 on 16 * 17 / 2 = 136 features.
No decay: S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t) / (phi(q_t) . sum_{j<=t} phi(k_j) + eps),
then o_proj.
"""
import flax.linen as nn

from linmoe.layers.common import compute_dtype
from linmoe.layers.feature_maps import FeatureMapAttention, symmetric_square
from linmoe.parallel.rules import ones_init, zeros_init

FEATURE_NORM_EPS = 1e-5


class Rebased(FeatureMapAttention):
  eps = 1e-5

  def feature_maps(self, q, k):
    norm = nn.LayerNorm(epsilon=FEATURE_NORM_EPS, dtype=compute_dtype(self.cfg), scale_init=ones_init("norm"),
                        bias_init=zeros_init("norm"), name="feature_norm")
    return symmetric_square(norm(q)), symmetric_square(norm(k))
