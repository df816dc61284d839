"""HGRN2 (Qin et al., 2024, "HGRN2: Gated Linear RNNs with State Expansion").

Per head, forget gate lambda_t = beta + (1 - beta) * sigmoid(W_f x_t) in (beta, 1) per key channel, and
the input gate tied to it, k_t = 1 - lambda_t:
S_t = diag(lambda_t) S_{t-1} + (1 - lambda_t) i_t^T, o_t = S_t^T q_t, with i_t = W_i x_t and
q_t = SiLU(W_q x_t) (HGRN1's output gate, which HGRN2 turns into the query; there is no other output
gate). The per-head normalized output is projected to d_model.

The lower bound beta grows with depth so that upper layers keep longer memories. HGRN2 learns it per
channel across the layers (a cumulative softmax over depth, starting at layer / n_layers); here it is
that starting value, fixed: beta = layer_idx / n_layers (0 for the first layer).
"""

import jax
import jax.numpy as jnp

from linmoe.layers.common import head_projection
from linmoe.layers.lsm import LSMLayer


def lower_bounded_log_sigmoid(logits: jnp.ndarray, bound: float | jax.Array) -> jnp.ndarray:
  """log(bound + (1 - bound) * sigmoid(logits)), finite (and with finite gradients) for any logits.

  Args:
    logits: any shape, fp32.
    bound: lower bound of the gate, in [0, 1): a Python number, or a traced scalar in a scanned stack
      (where bound 0 gives logaddexp(-inf, log_gate) = log_gate exactly).
  """
  log_gate = jax.nn.log_sigmoid(logits)
  if isinstance(bound, (int, float)) and bound == 0:
    return log_gate
  return jnp.logaddexp(jnp.log(bound), jnp.log1p(-bound) + log_gate)


class HGRN2(LSMLayer):
  family = "gla"

  def features(self, x, segment_ids):
    cfg = self.cfg
    q = jax.nn.silu(head_projection(cfg, "q_proj")(x))
    forget_logits = head_projection(cfg, "f_proj")(x).astype(jnp.float32)
    i = head_projection(cfg, "i_proj")(x)
    bound = self.layer_idx / cfg.n_layers
    k = (1.0 - bound) * jax.nn.sigmoid(-forget_logits)  # 1 - lambda_t
    return q, k.astype(i.dtype), i, lower_bounded_log_sigmoid(forget_logits, bound)
