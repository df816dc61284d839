"""The shared shell of every linear-sequence-model (LSM) layer.

An instance subclasses `LSMLayer`, names its recurrence family, and implements `features`, which turns
the input into the family op's per-token arguments (e.g. q, k, v and the log decay g). The shell runs
the op (the chunked form on sequences, the one-token step when decoding, with the memory kept in the
cache), normalizes each head's output, applies the instance's optional output gate and projects back to
d_model. Instances with other output paths override `output`.
"""
import dataclasses
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe import kernels
from linmoe.layers.common import head_projection, output_projection, rms_norm
from linmoe.layers.conv import ShortConv
from linmoe.layers.mixer import Mixer, cache_variable


@dataclasses.dataclass(frozen=True)
class Family:
  """A recurrence family: `sequence(*inputs, initial_state=, impl=, chunk_size=) -> (o, state)` over
  [batch, seq, ...] inputs and `step(*inputs_t, state) -> (o_t, state)` over [batch, ...] inputs."""
  sequence: Callable
  step: Callable


FAMILIES: dict[str, Family] = {
    "simple_gla": Family(kernels.simple_gla, kernels.simple_gla_step),
    "gla": Family(kernels.gla, kernels.gla_step),
}
OUTPUT_GATES: dict[str, Callable] = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


class LSMLayer(Mixer):
  """[batch, seq, d_model] -> [batch, seq, d_model]."""

  family: ClassVar[str]  # a key of FAMILIES
  output_gate: ClassVar[str | None] = None  # a key of OUTPUT_GATES, or no gate

  def features(self, x: jnp.ndarray) -> tuple[jnp.ndarray | None, ...]:
    """The family op's per-token inputs, e.g. (q, k, v, g) with q, k [batch, seq, heads, dk],
    v [batch, seq, heads, dv] and g [batch, seq, heads] (simple_gla), [batch, seq, heads, dk] (gla)
    or None."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    inputs = self.features(x)
    return self.output(self.recurrence(inputs), x)

  def recurrence(self, inputs: tuple[jnp.ndarray | None, ...], family: str | None = None,
                 name: str = "memory") -> jnp.ndarray:
    """Runs the family op on [batch, seq, ...] inputs; returns o [batch, seq, heads, dv].

    Outside training the final memory [batch, heads, dk, dv] (fp32) is kept in the cache as `name`.
    """
    family = FAMILIES[family or self.family]
    q, v = inputs[0], inputs[2]
    shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    memory = cache_variable(self, self.mode, name, lambda: jnp.zeros(shape, jnp.float32))
    if self.decoding:
      o, state = family.step(*(a if a is None else a[:, 0] for a in inputs), memory.value)
      o = o[:, None]
    else:
      o, state = family.sequence(*inputs, impl=self.cfg.kernel_impl, chunk_size=self.cfg.chunk_size)
    if memory is not None:
      memory.value = state
    return o

  def output(self, o: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Per-head RMSNorm, optional output gate from x, projection to d_model."""
    o = rms_norm(self.cfg, "o_norm")(o)
    if self.output_gate is not None:
      o = o * OUTPUT_GATES[self.output_gate](head_projection(self.cfg, "gate_proj")(x))
    return output_projection(self.cfg)(o)

  def qkv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Plain per-head projections q, k, v: [batch, seq, heads, head_dim] each."""
    return tuple(head_projection(self.cfg, f"{n}_proj")(x) for n in ("q", "k", "v"))

  def short_conv(self, x: jnp.ndarray, name: str, **kwargs) -> jnp.ndarray:
    """A causal short convolution over [batch, seq, heads, dim] (or [batch, seq, channels])."""
    flat = x.reshape(*x.shape[:2], -1)
    return ShortConv(mode=self.mode, name=name, **kwargs)(flat).reshape(x.shape)


def per_head_log_decay(log_decay_h: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Broadcasts a fixed per-head log decay [heads] to the op's [batch, seq, heads] layout."""
  return jnp.broadcast_to(log_decay_h.astype(jnp.float32), x.shape[:2] + log_decay_h.shape)
