"""RWKV6 "Finch" time mixing (Peng et al., 2024, "Eagle and Finch: RWKV with Matrix-Valued States and
Dynamic Recurrence").

Token shift by data-dependent interpolation (ddlerp) with the previous token: with dx_t = x_{t-1} - x_t,
  m_t = tanh((x_t + dx_t * mu_x) W_1) W_2   (five rank-32 LoRAs),  x^c_t = x_t + dx_t * (mu_c + m^c_t)
for c in (w, k, v, r, g); r, k, v = x^c W_c per head, the gate SiLU(x^g W_g), and a per-key-channel decay
w_t = exp(-exp(d_t)) from the LoRA d_t = d + tanh(x^w A_d) B_d (rank 64). The memory (`gla_bonus` op):
  o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(w_t) S_{t-1} + k_t v_t^T,
and out = W_o (GroupNorm_heads(o) * SiLU(x^g W_g)). Initialisation follows the paper's code: the mu from the
channel position and the depth, decay speeds d = -6 + 5 (i / (D - 1))^(0.7 + 1.3 l), the zigzag bonus u,
W_1 = A_d = 0 and W_2, B_d ~ U[+-0.01]. The previous token is kept in the cache for decoding.

Simplified: key and value dims are head_dim (the model's heads, not RWKV's 64-wide ones).
"""
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.kernels import segments
from linmoe.layers.common import compute_dtype, head_projection, output_projection
from linmoe.layers.feature_maps import unit_scale
from linmoe.layers.lsm import LSMLayer
from linmoe.layers.mixer import cache_variable
from linmoe.parallel.rules import logical, ones_init, zeros_init

MIX_RANK, DECAY_RANK = 32, 64
GROUP_NORM_EPS = 64e-5  # 1e-5 * head_size_divisor^2 in the paper's code
# Per interpolated input: (power, offset) of its init mu = 1 - ((i / d_model)^(power * r) + offset * l),
# with r = 1 - layer / n_layers and l = layer / (n_layers - 1).
MIX_INITS = {"w": (1.0, 0.0), "k": (1.0, 0.0), "v": (1.0, 0.3), "r": (0.5, 0.0), "g": (0.5, 0.0)}


def uniform_init(limit: float) -> Callable:
  """U[-limit, limit]."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -limit, limit)


def token_shift(layer: LSMLayer, x: jnp.ndarray, segment_ids: jnp.ndarray | None) -> jnp.ndarray:
  """x_{t-1} for every t, [batch, seq, d_model]: zeros before the first token in "train" and "prefill",
  the cached last token in "decode", and zeros at the first token of every document of segment_ids
  [batch, seq] | None."""
  zeros = jnp.zeros_like(x[:, :1])
  cache = cache_variable(layer, layer.mode, "previous_token", lambda: zeros)
  previous = cache.value.astype(x.dtype) if layer.decoding else zeros
  if cache is not None:
    cache.value = x[:, -1:]
  return segments.keep(segments.continues(segment_ids), jnp.concatenate([previous, x[:, :-1]], axis=1))


class RWKV6(LSMLayer):
  family = "gla_bonus"

  def depth_ratios(self) -> tuple[float, float]:
    """(layer / (n_layers - 1), 1 - layer / n_layers): the paper's ratio_0_to_1 and ratio_1_to_almost0."""
    n = self.cfg.n_layers
    return self.layer_idx / max(n - 1, 1), 1.0 - self.layer_idx / n

  def mix_init(self, power: float, offset: float) -> Callable:
    """The init of an interpolation weight mu [d_model] (see MIX_INITS)."""
    def init(key, shape, dtype=jnp.float32):
      del key  # deterministic
      position = jnp.arange(shape[-1], dtype=dtype) / shape[-1]
      ratio_0_to_1, ratio_1_to_0 = self.depth_ratios()
      return jnp.broadcast_to(1.0 - (position ** (power * ratio_1_to_0) + offset * ratio_0_to_1), shape)
    return init

  def channel_init(self, fn: Callable) -> Callable:
    """An init over all channels (any shape) from fn(channel index, its position in [0, 1], ratio_0_to_1)."""
    def init(key, shape, dtype=jnp.float32):
      del key  # deterministic
      channel = jnp.arange(math.prod(shape), dtype=dtype)
      return fn(channel, channel / (channel.size - 1), self.depth_ratios()[0]).reshape(shape)
    return init

  def ddlerp(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None) -> tuple[jnp.ndarray, ...]:
    """The five data-dependent interpolations x^c of x [batch, seq, d_model] with the previous token."""
    d_model = x.shape[-1]
    dx = token_shift(self, x, segment_ids) - x
    mu_x = self.param("mu_x", logical(self.mix_init(1.0, 0.0), "embed"), (d_model,))
    mu = jnp.stack([self.param(f"mu_{c}", logical(self.mix_init(*p), "embed"), (d_model,))
                    for c, p in MIX_INITS.items()])
    w1 = self.param("mix_w1", zeros_init("embed", "mix", "lora"), (d_model, len(MIX_INITS), MIX_RANK))
    w2 = self.param("mix_w2", logical(uniform_init(0.01), "mix", "lora", "embed"),
                    (len(MIX_INITS), MIX_RANK, d_model))
    mixes = jnp.einsum("btcr,crd->btcd", jnp.tanh(jnp.einsum("btd,dcr->btcr", x + dx * mu_x, w1)), w2)
    return jnp.unstack(x[:, :, None] + dx[:, :, None] * (mu + mixes), axis=2)

  def log_decay(self, x_w: jnp.ndarray) -> jnp.ndarray:
    """-exp(d_t) [batch, seq, heads, head_dim] fp32, from the LoRA on x^w [batch, seq, d_model]."""
    speed = self.channel_init(lambda n, pos, depth: -6.0 + 5.0 * pos ** (0.7 + 1.3 * depth))
    low_rank = nn.Dense(DECAY_RANK, use_bias=False, kernel_init=zeros_init("embed", "lora"),
                        dtype=compute_dtype(self.cfg), name="decay_down")(x_w)
    d = nn.DenseGeneral((self.cfg.n_heads, self.cfg.head_dim),
                        kernel_init=logical(uniform_init(0.01), "lora", "heads", "head_dim"),
                        bias_init=logical(speed, "heads", "head_dim"), dtype=compute_dtype(self.cfg),
                        name="decay_up")(jnp.tanh(low_rank))
    return -jnp.exp(d.astype(jnp.float32))

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    x_w, x_k, x_v, x_r, x_g = self.ddlerp(x, segment_ids)
    r, k, v, gate = (head_projection(self.cfg, f"{c}_proj")(x_c)
                     for c, x_c in (("r", x_r), ("k", x_k), ("v", x_v), ("g", x_g)))
    bonus_init = self.channel_init(lambda n, pos, depth: depth * (1.0 - pos) + ((n + 1) % 3 - 1) * 0.1)
    bonus = self.param("bonus", logical(bonus_init, "heads", "head_dim"), r.shape[2:])
    o = self.recurrence((unit_scale(r), k, v, self.log_decay(x_w), jnp.broadcast_to(bonus, r.shape)),
                        segment_ids)
    o = nn.LayerNorm(epsilon=GROUP_NORM_EPS, reduction_axes=-1, feature_axes=(-2, -1),
                     scale_init=ones_init("heads", "head_dim"), bias_init=zeros_init("heads", "head_dim"),
                     dtype=compute_dtype(self.cfg), name="g_norm")(o)  # GroupNorm, one group per head
    return output_projection(self.cfg)(o * jax.nn.silu(gate))
