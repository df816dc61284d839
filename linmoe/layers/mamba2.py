"""Mamba2 (Dao & Gu, 2024, "Transformers are SSMs: ... Structured State Space Duality"), the SSD layer.

Inner width 2 * d_model split into the model's heads (head dim P = 2 * head_dim), state size N = 128,
one group of B, C shared by all heads. x, B, C come from one projection through a causal depthwise
convolution (width 4) and SiLU; dt_t = softplus(W_dt x_t + dt_bias) per head; per head
  S_t = exp(-exp(A_log) dt_t) S_{t-1} + B_t (dt_t x_t)^T,   y_t = S_t^T C_t + D x_t,
i.e. scalar-decay linear attention with q = C, k = B, v = dt * x. The output is the gated RMSNorm
norm(y * SiLU(z)) over the whole inner width, with z = W_z x, projected back to d_model.
Initialization as in Mamba2: A = -exp(A_log) with exp(A_log) ~ U(1, 16), dt_bias = softplus^-1(dt) with
dt log-uniform in [1e-3, 1e-1], D = 1. Simplified: no dt limits.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.common import compute_dtype, head_projection, output_projection
from linmoe.layers.feature_maps import unit_scale
from linmoe.layers.lsm import LSMLayer
from linmoe.layers.ssm import dt_bias_init
from linmoe.parallel.rules import dense_init, logical, ones_init

EXPAND = 2
STATE_DIM = 128
CONV_WIDTH = 4
A_INIT_RANGE = (1.0, 16.0)


def a_log_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jnp.ndarray:
  """log A with A ~ U(A_INIT_RANGE): decay rates of the heads."""
  return jnp.log(jax.random.uniform(key, shape, dtype, *A_INIT_RANGE))


class Mamba2(LSMLayer):
  family = "simple_gla"

  @nn.compact
  def __call__(self, x, segment_ids=None):
    cfg = self.cfg
    heads, head_dim = cfg.n_heads, EXPAND * cfg.head_dim
    xbc = nn.Dense(heads * head_dim + 2 * STATE_DIM, use_bias=False, dtype=compute_dtype(cfg),
                   kernel_init=dense_init("embed", "mlp"), name="xbc_proj")(x)
    xbc = self.short_conv(xbc, segment_ids, "conv", width=CONV_WIDTH)
    xs, b, c = jnp.split(xbc, [heads * head_dim, heads * head_dim + STATE_DIM], axis=-1)
    xs = xs.reshape(*xs.shape[:2], heads, head_dim)  # [B, T, H, P]
    b, c = (jnp.broadcast_to(t[:, :, None], (*t.shape[:2], heads, STATE_DIM)) for t in (b, c))
    dt_bias = self.param("dt_bias", logical(dt_bias_init, "heads"), (heads,))
    dt = jax.nn.softplus(nn.Dense(heads, use_bias=False, dtype=compute_dtype(cfg),
                                  kernel_init=dense_init("embed", "heads"), name="dt_proj")(x)
                         .astype(jnp.float32) + dt_bias)  # [B, T, H]
    log_decay = -jnp.exp(self.param("A_log", logical(a_log_init, "heads"), (heads,))) * dt
    y = self.recurrence((unit_scale(c), b, (xs * dt[..., None]).astype(xs.dtype), log_decay), segment_ids)
    skip = self.param("D", ones_init("heads"), (heads,))
    return self.output(y + (skip[:, None] * xs).astype(y.dtype), x)

  def output(self, o, x, segment_ids=None):
    """Gated RMSNorm norm(o * SiLU(W_z x)) over all heads at once, then o_proj."""
    cfg = self.cfg
    z = head_projection(cfg, "z_proj", o.shape[-1])(x)
    norm = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), reduction_axes=(-2, -1),
                      feature_axes=(-2, -1), scale_init=ones_init("heads", "head_dim"), name="o_norm")
    return output_projection(cfg)(norm(o * jax.nn.silu(z)))
