"""Query and key maps shared by LSM instances, and the base of feature-map linear attention.

`FeatureMapAttention` is the no-decay recurrence S_t = S_{t-1} + phi(k_t) v_t^T read out with its exact
normalizer, o_t = S_t^T phi(q_t) / (sum_{j<=t} phi(k_j) . phi(q_t) + eps) (Based, Rebased). The
normalizer rides along in the same op: v gets a trailing constant channel 1, whose output is the
denominator, so the one fp32 state [batch, heads, feature_dim, head_dim + 1] serves training and decoding.
"""
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from linmoe.layers.common import head_projection, output_projection
from linmoe.layers.lsm import LSMLayer


def unit_scale(q: jnp.ndarray) -> jnp.ndarray:
  """Multiplies q [..., key_dim] by key_dim ** 0.5, cancelling the ops' default scale key_dim ** -0.5,
  for instances whose paper reads the memory unscaled (o_t = S_t^T q_t)."""
  return q * q.shape[-1] ** 0.5


def symmetric_square(x: jnp.ndarray) -> jnp.ndarray:
  """The degree-2 polynomial feature map with phi(x) . phi(y) = (x . y)^2 on d(d + 1) / 2 features.

  Args:
    x: [..., d].
  Returns:
    [..., d (d + 1) / 2]: x_i^2 for each i, then sqrt(2) x_i x_j for each i < j.
  """
  d = x.shape[-1]
  rows, cols = np.triu_indices(d, 1)
  off_diagonal = x[..., rows] * x[..., cols] * 2.0**0.5
  return jnp.concatenate([x * x, off_diagonal], axis=-1)


def taylor_exp(x: jnp.ndarray) -> jnp.ndarray:
  """Based's second-order Taylor feature map of exp(q . k / sqrt(d)).

  phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d) (positive for every s).

  Args:
    x: [..., d].
  Returns:
    [..., 1 + d + d (d + 1) / 2].
  """
  z = x * x.shape[-1] ** -0.25
  quadratic = symmetric_square(z) * 0.5**0.5
  return jnp.concatenate([jnp.ones_like(z[..., :1]), z, quadratic], axis=-1)


class FeatureMapAttention(LSMLayer):
  """q, k projected to `feature_dim` per head and mapped by `feature_maps`; no decay; exact normalizer."""

  family = "simple_gla"
  feature_dim: ClassVar[int] = 16  # per-head width of q and k before the feature map
  eps: ClassVar[float]  # added to the normalizer

  def feature_maps(self, q: jnp.ndarray, k: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[batch, seq, heads, feature_dim] each -> phi(q), phi(k) [batch, seq, heads, n_features]."""
    raise NotImplementedError

  def features(self, x, segment_ids):
    cfg = self.cfg
    q, k = (head_projection(cfg, f"{n}_proj", self.feature_dim)(x) for n in ("q", "k"))
    v = head_projection(cfg, "v_proj")(x)
    q, k = self.feature_maps(q, k)
    with_normalizer = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    return unit_scale(q), k, with_normalizer, None

  def normalize(self, o: jnp.ndarray) -> jnp.ndarray:
    """[batch, seq, heads, head_dim + 1] (numerator, denominator) -> [batch, seq, heads, head_dim]."""
    o32 = o.astype(jnp.float32)
    return (o32[..., :-1] / (o32[..., -1:] + self.eps)).astype(o.dtype)

  def output(self, o, x, segment_ids=None):
    """The normalized output projected to d_model (no norm or gate, as in the papers)."""
    return output_projection(self.cfg)(self.normalize(o))
