"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution").

The generalized delta rule with a diagonal-plus-low-rank transition, in the paper's notation (state [V, K]):
  S_t = S_{t-1} (diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t)) + v_t^T k~_t,   o_t = S_t r_t,
run as the `dplr` op on the transposed state [K, V] with a = -kappa_hat, b = kappa_hat * a_t (as
flash-linear-attention's chunk_rwkv7). Token shift with dx_t = x_{t-1} - x_t (the previous token kept in
the cache for decoding, rwkv6.py): x^c = x + dx * mu_c for c in (r, w, k, v, a, g); r, k, v = x^c W_c per
head; from LoRAs (down, activation, up): the log decay log w_t = -e^{-1/2} sigmoid(LoRA_w(x^w)) (tanh) per key
channel, the in-context learning rate a_t = sigmoid(LoRA_a(x^a)), the gate g_t = LoRA_g(x^g) (sigmoid, no
bias); the removal key kappa_hat = L2norm(k * k_k) per head and the written key k~ = k * (1 + (a - 1) k_a).
out = W_o ((GroupNorm_heads(o) + sum_heads(r * k~ * r_k) v) * g). Initialisation follows the paper's code
(token-shift mixes, decay speeds, a bias, k_k, k_a, r_k, norm weights, zero LoRA down projections; RWKV6's
helpers, whose class this extends).
Simplified: no value residual (v mixed with layer 0's v, which needs a cross-layer input); LoRA ranks by
flash-linear-attention's formula without its head_dim / 64 factor; W_r, W_k, W_v, W_o keep the default init
(the paper: orthogonal, W_o zero).
"""
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.common import compute_dtype, head_projection, output_projection
from linmoe.layers.delta_common import l2_normalize
from linmoe.layers.feature_maps import unit_scale
from linmoe.layers.rwkv6 import GROUP_NORM_EPS, RWKV6, token_shift
from linmoe.parallel.rules import logical, zeros_init

# Token-shift mix powers p: mu_c = 1 - (i / d_model)^(p * (1 - layer / n_layers)).
MIX_POWERS = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
MAX_LOG_DECAY = math.exp(-0.5)
LORA_UP_SCALE = 0.1


def lora_rank(d_model: int, multiplier: float) -> int:
  """max(32, multiplier * sqrt(d_model) rounded to a multiple of 32)."""
  return max(32, int(round(multiplier * d_model**0.5 / 32)) * 32)


class RWKV7(RWKV6):
  family = "dplr"

  def zigzag_linear(self, n: jnp.ndarray, pos: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The paper's per-channel init shapes: a signed square ramp inside each head, and pos - 1/2."""
    half = (self.cfg.head_dim - 1) / 2
    zigzag = (n % self.cfg.head_dim - half) / half
    return zigzag * jnp.abs(zigzag), pos - 0.5

  def lora(self, x: jnp.ndarray, name: str, rank: int, activation: Callable | None,
           bias_init: Callable | None) -> jnp.ndarray:
    """up(activation(down(x))) per head and key channel: [batch, seq, d_model] -> [batch, seq, heads, dim]."""
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    h = nn.Dense(rank, use_bias=False, kernel_init=zeros_init("embed", "lora"), dtype=dtype,
                 name=f"{name}_down")(x)
    h = h if activation is None else activation(h)
    up = nn.Dense(cfg.d_model, use_bias=bias_init is not None,
                  bias_init=logical(bias_init or nn.initializers.zeros, "channels"),
                  kernel_init=logical(nn.initializers.orthogonal(LORA_UP_SCALE), "lora", "channels"),
                  dtype=dtype, name=f"{name}_up")(h)
    return up.reshape(*x.shape[:2], cfg.n_heads, cfg.head_dim)

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    cfg = self.cfg
    dx = token_shift(self, x, segment_ids) - x
    x_r, x_w, x_k, x_v, x_a, x_g = (
        x + dx * self.param(f"mu_{c}", logical(self.mix_init(p, 0.0), "embed"), (cfg.d_model,))
        for c, p in MIX_POWERS.items())
    r, k, v = (head_projection(cfg, f"{c}_proj")(x_c) for c, x_c in (("r", x_r), ("k", x_k), ("v", x_v)))

    def speed(n, pos, depth):  # the decay LoRA's bias
      return -6.0 + 6.0 * pos ** (1.0 + depth**0.3) + 0.5 + 2.5 * self.zigzag_linear(n, pos)[0]

    def a_bias(n, pos, depth):
      zigzag, linear = self.zigzag_linear(n, pos)
      return -0.19 + 0.3 * zigzag + 0.4 * linear

    decay_rank, gate_rank = lora_rank(cfg.d_model, 2.5), lora_rank(cfg.d_model, 5.0)
    w_logit = self.lora(x_w, "w_lora", decay_rank, jnp.tanh, self.channel_init(speed))
    log_w = -MAX_LOG_DECAY * jax.nn.sigmoid(w_logit.astype(jnp.float32))
    a = jax.nn.sigmoid(self.lora(x_a, "a_lora", decay_rank, None, self.channel_init(a_bias)))
    g = self.lora(x_g, "g_lora", gate_rank, jax.nn.sigmoid, None)

    key_removal = self.channel_init(lambda n, pos, depth: 0.71 - 0.1 * self.zigzag_linear(n, pos)[1])
    k_k = self.param("k_k", logical(key_removal, "heads", "head_dim"), k.shape[2:])
    k_a = self.param("k_a", logical(nn.initializers.constant(1.02), "heads", "head_dim"), k.shape[2:])
    r_k = self.param("r_k", logical(nn.initializers.constant(-0.04), "heads", "head_dim"), k.shape[2:])
    kappa = l2_normalize(k * k_k)
    k = k * (1.0 + (a - 1.0) * k_a)
    o = self.recurrence((unit_scale(r), k, v, -kappa, kappa * a, log_w), segment_ids)

    norm_weight = ((self.layer_idx + 1) / cfg.n_layers) ** 0.7
    o = nn.LayerNorm(epsilon=GROUP_NORM_EPS, reduction_axes=-1, feature_axes=(-2, -1),
                     scale_init=logical(nn.initializers.constant(norm_weight), "heads", "head_dim"),
                     bias_init=zeros_init("heads", "head_dim"), dtype=compute_dtype(cfg),
                     name="g_norm")(o)  # GroupNorm, one group per head
    bonus = jnp.sum(r * k * r_k, axis=-1, keepdims=True) * v
    return output_projection(cfg)((o + bonus) * g)
