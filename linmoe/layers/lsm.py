"""The shared shell of every linear-sequence-model (LSM) layer.

An instance subclasses `LSMLayer`, names its recurrence family, and implements `features`, which turns
the input into the family op's per-token arguments (e.g. q, k, v and the log decay g). The shell runs
the op (the chunked form on sequences, the one-token step when decoding, with the memory kept in the
cache), normalizes each head's output, applies the instance's optional output gate and projects back to
d_model. Instances with other output paths override `output`.

Packed documents: `segment_ids` [batch, seq] int32 (linmoe/kernels/segments.py) reach the family op, LASP-2,
the short convolutions and every other place an instance reads earlier tokens, so that no information
crosses a document boundary; None means one document per row (and is what decoding passes).
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
from linmoe.parallel import sequence
from linmoe.parallel.lasp2 import Carry, DecayCarry, MatrixCarry, lasp2


@dataclasses.dataclass(frozen=True)
class Family:
  """A recurrence family: `sequence(*inputs, initial_state=, impl=, chunk_size=) -> (o, state)` over
  [batch, seq, ...] inputs and `step(*inputs_t, state) -> (o_t, state)` over [batch, ...] inputs;
  `carry` says how LASP-2 carries the state across sequence shards (linmoe/parallel/lasp2.py);
  `zero_state(shape)` is the empty state for the memory shape [batch, heads, dk, dv];
  `gated_inputs` are the positions of the inputs that, zeroed at a token, leave the state unchanged
  there (used by Mixture-of-Memories for memories a token is not routed to)."""
  sequence: Callable
  step: Callable
  carry: Carry
  zero_state: Callable = lambda shape: jnp.zeros(shape, jnp.float32)
  gated_inputs: tuple[int, ...] = ()


FAMILIES: dict[str, Family] = {
    "simple_gla": Family(kernels.simple_gla, kernels.simple_gla_step, DecayCarry(),
                         gated_inputs=(1, 3)),  # k, g
    "gla": Family(kernels.gla, kernels.gla_step, DecayCarry(), gated_inputs=(1, 3)),  # k, g
    "gla_bonus": Family(kernels.gla_bonus, kernels.gla_bonus_step, DecayCarry(reads_before_update=True)),
    "diagonal_ssm": Family(kernels.diagonal_ssm, kernels.diagonal_ssm_step, DecayCarry()),
    "delta_rule": Family(kernels.delta_rule, kernels.delta_rule_step, MatrixCarry(),
                         gated_inputs=(3, 4)),  # beta, g
    "dplr": Family(kernels.dplr, kernels.dplr_step, MatrixCarry()),
    "titans": Family(kernels.titans, kernels.titans_step, MatrixCarry(parts=2),  # (memory, momentum)
                     lambda shape: (jnp.zeros(shape, jnp.float32),) * 2),
}
OUTPUT_GATES: dict[str, Callable] = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid, "gelu": jax.nn.gelu}


class LSMLayer(Mixer):
  """[batch, seq, d_model] -> [batch, seq, d_model]."""

  family: ClassVar[str]  # a key of FAMILIES
  output_gate: ClassVar[str | None] = None  # a key of OUTPUT_GATES, or no gate

  def features(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None) -> tuple[jnp.ndarray | None, ...]:
    """The family op's per-token inputs, e.g. (q, k, v, g) with q, k [batch, seq, heads, dk],
    v [batch, seq, heads, dv] and g [batch, seq, heads] (simple_gla), [batch, seq, heads, dk] (gla)
    or None. `segment_ids` [batch, seq] | None is for the features that read earlier tokens."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None,
               memory_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [batch, seq, d_model]; `segment_ids` [batch, seq] int32 | None, the document of each token;
    `memory_mask` [batch, seq] (1 = update): where 0 the memory neither decays nor updates."""
    inputs = self.features(x, segment_ids)
    if memory_mask is not None:
      inputs = mask_updates(inputs, FAMILIES[self.family].gated_inputs, memory_mask)
    return self.output(self.recurrence(inputs, segment_ids), x, segment_ids)

  def recurrence(self, inputs: tuple[jnp.ndarray | None, ...], segment_ids: jnp.ndarray | None,
                 family: str | None = None, name: str = "memory") -> jnp.ndarray:
    """Runs the family op on [batch, seq, ...] inputs, the memory restarting at every new document of
    segment_ids [batch, seq] | None; returns o [batch, seq, heads, dv].

    Outside training the final memory [batch, heads, dk, dv] (fp32) is kept in the cache as `name`;
    in training with the sequence split over the mesh, LASP-2 runs the op.
    """
    family = FAMILIES[family or self.family]
    q, v = inputs[0], inputs[2]
    shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    memory = cache_variable(self, self.mode, name, lambda: family.zero_state(shape))
    if self.decoding:
      if segment_ids is not None:
        raise ValueError("decoding takes one document per row: segment_ids must be None")
      o, state = family.step(*(a if a is None else a[:, 0] for a in inputs), memory.value)
      o = o[:, None]
    elif sequence.is_split(self.mode):
      o, state = lasp2(family.sequence, family.carry, inputs, segment_ids=segment_ids,
                       impl=self.cfg.kernel_impl, chunk_size=self.cfg.chunk_size)
    else:
      o, state = family.sequence(*inputs, segment_ids=segment_ids, impl=self.cfg.kernel_impl,
                                 chunk_size=self.cfg.chunk_size)
    if memory is not None:
      memory.value = state
    return o

  def output(self, o: jnp.ndarray, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-head RMSNorm, optional output gate from x, projection to d_model (segment_ids: for outputs
    that read earlier tokens)."""
    o = rms_norm(self.cfg, "o_norm")(o)
    if self.output_gate is not None:
      o = o * OUTPUT_GATES[self.output_gate](head_projection(self.cfg, "gate_proj")(x))
    return output_projection(self.cfg)(o)

  def qkv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Plain per-head projections q, k, v: [batch, seq, heads, head_dim] each."""
    return tuple(head_projection(self.cfg, f"{n}_proj")(x) for n in ("q", "k", "v"))

  def short_conv(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None, name: str, **kwargs) -> jnp.ndarray:
    """A causal short convolution over [batch, seq, heads, dim] (or [batch, seq, channels]) that reads
    no token of another document (segment_ids [batch, seq] | None)."""
    flat = x.reshape(*x.shape[:2], -1)
    return ShortConv(mode=self.mode, name=name, **kwargs)(flat, segment_ids).reshape(x.shape)


def mask_updates(inputs: tuple[jnp.ndarray | None, ...], gated: tuple[int, ...],
                 mask: jnp.ndarray) -> tuple[jnp.ndarray | None, ...]:
  """Zeroes the gated inputs ([batch, seq, ...]) where mask [batch, seq] is 0."""
  if not gated:
    raise ValueError("this recurrence family cannot skip tokens (no gated inputs)")
  def apply(i, a):
    if i not in gated or a is None:
      return a
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)) > 0, a, 0)  # -inf * 0 would be NaN
  return tuple(apply(i, a) for i, a in enumerate(inputs))


def per_head_log_decay(log_decay_h: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Broadcasts a fixed per-head log decay [heads] to the op's [batch, seq, heads] layout."""
  return jnp.broadcast_to(log_decay_h.astype(jnp.float32), x.shape[:2] + log_decay_h.shape)
