"""The shared shell of every linear-sequence-model (LSM) layer.

An instance subclasses `LSMLayer`, names its recurrence family, and implements `features`, which turns
the input into the family op's arguments (q, k, v and the log decay). The shell runs the op, normalizes
each head's output, applies the instance's optional output gate and projects back to d_model.
"""
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe import kernels
from linmoe.config import ModelConfig
from linmoe.layers.common import head_projection, output_projection, rms_norm

FAMILY_OPS: dict[str, Callable] = {"simple_gla": kernels.simple_gla, "gla": kernels.gla}
OUTPUT_GATES: dict[str, Callable] = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


class LSMLayer(nn.Module):
  """[batch, seq, d_model] -> [batch, seq, d_model]."""
  cfg: ModelConfig
  layer_idx: int

  family: ClassVar[str]  # a key of FAMILY_OPS
  output_gate: ClassVar[str | None] = None  # a key of OUTPUT_GATES, or no gate

  def features(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """Returns q, k [batch, seq, heads, dk], v [batch, seq, heads, dv] and the log decay g
    ([batch, seq, heads] for simple_gla, [batch, seq, heads, dk] for gla, or None)."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    q, k, v, g = self.features(x)
    o, _ = FAMILY_OPS[self.family](q, k, v, g, impl=self.cfg.kernel_impl,
                                   chunk_size=self.cfg.chunk_size)
    o = rms_norm(self.cfg, "o_norm")(o)
    if self.output_gate is not None:
      o = o * OUTPUT_GATES[self.output_gate](head_projection(self.cfg, "gate_proj")(x))
    return output_projection(self.cfg)(o)

  def qkv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Plain per-head projections q, k, v: [batch, seq, heads, head_dim] each."""
    return tuple(head_projection(self.cfg, f"{n}_proj")(x) for n in ("q", "k", "v"))


def per_head_log_decay(log_decay_h: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Broadcasts a fixed per-head log decay [heads] to the op's [batch, seq, heads] layout."""
  return jnp.broadcast_to(log_decay_h.astype(jnp.float32), x.shape[:2] + log_decay_h.shape)
