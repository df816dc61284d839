"""LASP-2 (Sun et al. 2025): a recurrence op over sequences split on the "sequence" mesh axis.

Every family op is affine in its initial state: over a span of tokens, final = A(S_0) + S_local and
o = o_local + R(S_0), with A (the span's transition) and R (how the outputs read S_0) linear. Each shard
runs the op on its tokens from a zero state (o_local, S_local) and forms its A and R; one all-gather over
"sequence" brings every shard all (A_s, S_local(s)), small and independent of the sequence length; shard r
combines its prefix state P_r = A_{r-1}(P_{r-1}) + S_local(r - 1) (P_0 = the initial state) and adds
R(P_r) to its outputs. Gradients are JAX's autodiff of this program (the all-gather transposes to a
reduce-scatter), so the backward pass mirrors the forward with one collective more.

A family's `Carry` says how to form A and R:
- `DecayCarry` (simple_gla, gla, gla_bonus, diagonal_ssm): A is the span's total decay (elementwise on the
  state), R reads P through the queries decayed from the span start: scale * (q_t * e^{b_t})^T P with
  b_t the cumulative log decay up to t (up to t - 1 for gla_bonus, which reads the memory before the
  token). No extra op run.
- `MatrixCarry` (delta_rule, dplr, titans): A is a K x K matrix (2K x 2K for titans' (memory, momentum)
  pair) acting on the state's key side. Both A and R come from the same local op call with the values
  widened by n * K zero columns and the initial state's new columns set to the identity: the op acts on
  value columns independently, so the new columns of the final state are A and those of the output are
  R's query matrix Q_eff [batch, seq / S, heads, n * K], and o += Q_eff P. Cost: one op run on
  value_dim + n * K columns instead of value_dim.

Packed documents (segment_ids [batch, seq]): each shard runs the op on its own ids, so its S_local is the
state of its last document only; the prefix P_r reaches only the shard's first document (the one that may
continue across the edge) and passes through the shard only if the shard has no boundary (A = 0
otherwise). `DecayCarry` masks its reader and transition; `MatrixCarry` gets both from the op, whose
initial state (the identity columns) belongs to the first document. A shard whose first token starts a
document (a boundary on the shard edge) zeroes the prefix it receives.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from linmoe.kernels import segments
from linmoe.kernels.chunked import LOG_DECAY_FLOOR
from linmoe.kernels.common import STATE_DTYPE, default_scale
from linmoe.parallel import sequence

_Q, _V = 0, 2  # positions of q and v in every family op's inputs


@dataclasses.dataclass(frozen=True)
class Local:
  """One shard's results: o [batch, seq / S, heads, value_dim] from a zero state, its state and
  transition (in the carry's stacked layout) and what the output correction reads."""
  o: jax.Array
  state: jax.Array
  transition: jax.Array
  reader: tuple


@dataclasses.dataclass(frozen=True)
class DecayCarry:
  """Diagonal transition from the log decay inputs[g_index]: [batch, seq, heads] (per head),
  [.., key_dim] (per key channel) or [.., key_dim, value_dim] (per state entry)."""
  g_index: int = 3
  reads_before_update: bool = False  # the output at t reads the memory before token t (gla_bonus)

  def stack(self, state: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """The op's state [batch, heads, key_dim, value_dim] (zeros when None), fp32."""
    return jnp.zeros(shape, STATE_DTYPE) if state is None else state.astype(STATE_DTYPE)

  def unstack(self, state: jax.Array) -> jax.Array:
    return state

  def run(self, op: Callable, inputs: tuple, op_kwargs: dict, segment_ids: jax.Array | None) -> Local:
    o, state = op(*inputs, segment_ids=segment_ids, **op_kwargs)
    q, g = inputs[_Q], inputs[self.g_index]
    if g is None:  # no decay
      g = jnp.zeros(q.shape[:3], STATE_DTYPE)
    g = jnp.maximum(g.astype(STATE_DTYPE), LOG_DECAY_FLOOR)
    g = g.reshape(g.shape + (1,) * (5 - g.ndim))  # [batch, seq, heads, key_dim | 1, value_dim | 1]
    cum = jnp.cumsum(g, axis=1)
    read = cum - g if self.reads_before_update else cum
    scale = default_scale(op_kwargs.get("scale"), q.shape[-1])
    transition, reader_q = jnp.exp(cum[:, -1]), scale * q.astype(STATE_DTYPE)
    if segment_ids is not None:  # only the first document reads P; only a shard without a boundary passes it
      in_first = jnp.cumprod(segments.continues(segment_ids), axis=1).astype(bool)  # [batch, seq]
      transition, reader_q = segments.keep(in_first[:, -1], transition), segments.keep(in_first, reader_q)
    return Local(o, state, transition, (reader_q, read))

  def advance(self, transition: jax.Array, state: jax.Array) -> jax.Array:
    return transition * state

  def correction(self, reader: tuple, prefix: jax.Array) -> jax.Array:
    """scale * (q_t * e^{b_t})^T P: [batch, seq / S, heads, value_dim] fp32."""
    q, read = reader
    if read.shape[-1] == 1:  # the decay is the same for every value column: fold it into q
      return jnp.einsum("bthk,bhkv->bthv", q * jnp.exp(read[..., 0]), prefix)
    return jnp.einsum("bthk,bthkv,bhkv->bthv", q, jnp.exp(read), prefix)


@dataclasses.dataclass(frozen=True)
class MatrixCarry:
  """Matrix transition from one widened op run (module docstring); the state is a tuple of `parts`
  arrays [batch, heads, key_dim, value_dim] (one array when parts == 1), stacked as
  [batch, heads, parts * key_dim, value_dim]."""
  parts: int = 1

  def split(self, state) -> tuple[jax.Array, ...]:
    return state if self.parts > 1 else (state,)

  def join(self, parts: tuple[jax.Array, ...]):
    return parts if self.parts > 1 else parts[0]

  def stack(self, state, shape: tuple[int, ...]) -> jax.Array:
    """The op's state (zeros when None) as [batch, heads, parts * key_dim, value_dim] fp32."""
    if state is None:
      batch, heads, key_dim, value_dim = shape
      return jnp.zeros((batch, heads, self.parts * key_dim, value_dim), STATE_DTYPE)
    return jnp.concatenate(self.split(state), axis=-2).astype(STATE_DTYPE)

  def unstack(self, state: jax.Array):
    return self.join(tuple(jnp.split(state, self.parts, axis=-2)))

  def run(self, op: Callable, inputs: tuple, op_kwargs: dict, segment_ids: jax.Array | None) -> Local:
    q, v = inputs[_Q], inputs[_V]
    (batch, seq, heads, key_dim), value_dim = q.shape, v.shape[-1]
    width = self.parts * key_dim
    wide_v = jnp.concatenate([v, jnp.zeros((batch, seq, heads, width), v.dtype)], axis=-1)
    eye = jnp.eye(width, dtype=STATE_DTYPE)
    initial = tuple(
        jnp.broadcast_to(jnp.pad(eye[i * key_dim:(i + 1) * key_dim], [(0, 0), (value_dim, 0)]),
                         (batch, heads, key_dim, value_dim + width)) for i in range(self.parts))
    wide_inputs = inputs[:_V] + (wide_v,) + inputs[_V + 1:]
    o, state = op(*wide_inputs, initial_state=self.join(initial), segment_ids=segment_ids, **op_kwargs)
    state = jnp.concatenate(self.split(state), axis=-2)  # [batch, heads, width, value_dim + width]
    return Local(o[..., :value_dim], state[..., :value_dim], state[..., value_dim:],
                 (o[..., value_dim:],))

  def advance(self, transition: jax.Array, state: jax.Array) -> jax.Array:
    return jnp.einsum("bhij,bhjv->bhiv", transition, state)

  def correction(self, reader: tuple, prefix: jax.Array) -> jax.Array:
    """Q_eff P: [batch, seq / S, heads, value_dim] fp32."""
    return jnp.einsum("bthj,bhjv->bthv", reader[0].astype(STATE_DTYPE), prefix)


Carry = DecayCarry | MatrixCarry


def _per_token(x, q: jax.Array) -> bool:
  """Whether an op input is per token ([batch, seq, heads, ...] as q), so split over the sequence."""
  return x is not None and x.ndim >= 3 and x.shape[:2] == q.shape[:2]


def lasp2(op: Callable, carry: Carry, inputs: tuple, *, initial_state=None,
          segment_ids: jax.Array | None = None, **op_kwargs) -> tuple[jax.Array, object]:
  """The family op `op(*inputs, initial_state=, **op_kwargs) -> (o, final_state)` over sequences split on
  the "sequence" mesh axis; same results as the op on whole sequences.

  Args:
    op: a recurrence op (linmoe.kernels) whose inputs start (q, k, v, ...).
    carry: the family's `DecayCarry` or `MatrixCarry`.
    inputs: the op's positional inputs: [batch, seq, ...] arrays (split over "sequence"), None, or
      arrays without a seq axis (e.g. gla_bonus's u [heads, key_dim]; every shard sees them whole).
    initial_state: optional state at the start of the sequence, in the op's layout (it belongs to the
      first token's document).
    segment_ids: [batch, seq] int32 | None, the document of each token (module docstring).
    op_kwargs: the op's keywords (scale, impl, chunk_size, ...).
  Returns:
    o [batch, seq, heads, value_dim] in v's dtype, split over "sequence"; the final state in the op's
    layout (fp32).
  """
  q, v = inputs[_Q], inputs[_V]
  sequence.check_divisible(q.shape[1])
  initial = carry.stack(initial_state, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))

  ids = () if segment_ids is None else (segment_ids,)

  def body(inputs, initial, ids):
    shard_ids = ids[0] if ids else None
    local = carry.run(op, inputs, op_kwargs, shard_ids)
    transitions, states = sequence.gather(local.transition), sequence.gather(local.state)  # [S, ...]
    if ids:  # [S, batch]: shard s's first token continues the document of shard s - 1's last token
      continues = sequence.gather(shard_ids[:, 0]) == jnp.roll(sequence.gather(shard_ids[:, -1]), 1, axis=0)
    prefixes, state = [], initial
    for s in range(sequence.shards()):
      if ids and s > 0:
        state = segments.keep(continues[s], state)
      prefixes.append(state)
      state = carry.advance(transitions[s], state) + states[s]
    prefix = jnp.stack(prefixes)[sequence.shard_index()]
    o = local.o.astype(STATE_DTYPE) + carry.correction(local.reader, prefix)
    return o.astype(v.dtype), state[None]  # every shard holds the final state; the last one's is kept

  specs = tuple(sequence.SPLIT if _per_token(x, q) else sequence.WHOLE for x in inputs)
  o, finals = sequence.per_shard(body, (specs, sequence.WHOLE, (sequence.SPLIT,) * len(ids)),
                                 (sequence.SPLIT, jax.sharding.PartitionSpec(sequence.AXIS)))(
                                     inputs, initial, ids)
  return o, carry.unstack(finals[-1])
