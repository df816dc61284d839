"""Based linear attention (Arora et al., 2024, "Simple linear attention language models balance the
recall-throughput tradeoff").

q, k are projected to 16 dims per head and mapped by the 2nd-order Taylor expansion of exp:
phi(q) . phi(k) = 1 + s + s^2 / 2, s = q . k / 4 (1 + 16 + 136 = 153 features). No decay:
S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t) / (phi(q_t) . sum_{j<=t} phi(k_j)), then o_proj.

Based interleaves this with small sliding-window softmax attention layers (window 64) and gated short
convolutions. Here the window part is an option of the layer: with `window > 0` a local softmax attention
(own q, k, v projections with rotary positions) is added to the normalized output before o_proj, decoded
with a window-sized KV cache. Off by default, so `based` is the pure linear-attention layer (the Based
models' convolution layers are not included).
"""
from typing import ClassVar

from linmoe.layers.common import head_projection, output_projection, rotary
from linmoe.layers.feature_maps import FeatureMapAttention, taylor_exp
from linmoe.layers.window_attention import SlidingWindowAttention


class Based(FeatureMapAttention):
  eps = 1e-12
  window: ClassVar[int] = 0  # sliding-window softmax attention added to the output; 0: none

  def feature_maps(self, q, k):
    return taylor_exp(q), taylor_exp(k)

  def output(self, o, x, segment_ids=None):
    o = self.normalize(o)
    if self.window:
      o = o + self.local_attention(x, segment_ids)
    return output_projection(self.cfg)(o)

  def local_attention(self, x, segment_ids):
    """Sliding-window softmax attention over x [batch, seq, d_model] -> [batch, seq, heads, head_dim],
    within each document of segment_ids [batch, seq] | None."""
    cfg = self.cfg
    q, k, v = (head_projection(cfg, f"window_{n}_proj")(x) for n in ("q", "k", "v"))
    offset = self.position_offset(x.shape[1])
    q, k = (rotary(t, cfg.rope_theta, offset) for t in (q, k))
    return SlidingWindowAttention(self.mode, self.window, name="window")(q, k, v, offset, segment_ids)
