"""What the diagonal state-space layers (S4D, Mamba) share: the SSM on the `diagonal_ssm` op, its S4D-Real
state matrix and its timescale initialisations.

Per channel d and state n, with step size dt_t[d] > 0 and A[d, n] < 0 (zero-order hold for A, Euler for B,
as Mamba discretizes):
  h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[d, n] x_t[d]
  y_t[d]    = sum_n C_t[d, n] h_t[d, n] + D_d x_t[d]
"""
import math
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from linmoe.layers.feature_maps import unit_scale
from linmoe.layers.lsm import LSMLayer
from linmoe.parallel.rules import logical

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def log_dt_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jnp.ndarray:
  """log dt ~ U[log DT_MIN, log DT_MAX], the timescales of S4D and Mamba."""
  return jax.random.uniform(key, shape, dtype, math.log(DT_MIN), math.log(DT_MAX))


def dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jnp.ndarray:
  """softplus^-1(dt) with dt = exp(log_dt_init) floored at DT_FLOOR, so that softplus(bias) = dt (Mamba)."""
  dt = jnp.maximum(jnp.exp(log_dt_init(key, shape, dtype)), DT_FLOOR)
  return dt + jnp.log(-jnp.expm1(-dt))


def s4d_real_log_a(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jnp.ndarray:
  """A_log [channels, state] with A = -exp(A_log) = -(n + 1) for state n (S4D-Real)."""
  del key  # deterministic
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


class DiagonalSSMLayer(LSMLayer):
  """Base of the layers whose memory is a diagonal SSM; `ssm` runs it with the cache handled by the shell."""

  family = "diagonal_ssm"
  state_size: ClassVar[int]  # N
  skip_init: ClassVar[Callable]  # initializer of D

  def ssm(self, x: jnp.ndarray, dt: jnp.ndarray, b: jnp.ndarray, c: jnp.ndarray,
          segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """y = SSM(x) + D x, with A and D parameters of this layer.

    Args:
      x: input [batch, seq, channels].
      dt: step sizes > 0, [batch, seq, channels] or [channels] (time invariant).
      b, c: input and readout maps, either per channel [batch, seq, channels, state] (run with one head
        per channel and value_dim 1) or shared by all channels [batch, seq, state] (run as one head with
        key_dim = state and value_dim = channels).
      segment_ids: [batch, seq] int32 | None, the document of each token (the state restarts at each).

    Returns:
      y [batch, seq, channels] fp32.
    """
    channels = x.shape[-1]
    a = -jnp.exp(self.param("A_log", logical(s4d_real_log_a, "mlp", "state"), (channels, self.state_size)))
    dt = jnp.broadcast_to(dt.astype(jnp.float32), x.shape)
    g = dt[..., None] * a  # [batch, seq, channels, state]
    v = dt * x
    if b.ndim == 4:
      y = self.recurrence((unit_scale(c), b, v[..., None], g[..., None]), segment_ids)[..., 0]
    else:
      g = jnp.swapaxes(g, -1, -2)[:, :, None]  # [batch, seq, 1, state, channels]
      y = self.recurrence((unit_scale(c)[:, :, None], b[:, :, None], v[:, :, None], g),
                          segment_ids)[:, :, 0]
    return y + self.param("D", logical(self.skip_init, "mlp"), (channels,)) * x
