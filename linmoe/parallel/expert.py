"""Expert parallelism: the experts split over the "expert" mesh axis, token slots moved by all_to_all.

Outside the MoE layer "expert" is one more data axis, so the [tokens, d_model] rows are split over
("data", "fsdp", "expert") and the expert weights [experts, ...] over "expert". Inside one shard_map,
manual over those token axes, each shard
1. sorts its slots by expert (`sort_slots`); in capacity mode it keeps, per expert, the slots whose rank
   in the global token order is under the capacity (the local ranks offset by the slots that earlier
   token shards sent to that expert: one all_gather of the [experts] counts);
2. packs the kept slots bound for each expert shard into a [shards, local slots, d_model] buffer (room
   for every local slot per destination, so the transport never drops one) and exchanges it, with the
   [shards, local experts] counts, by all_to_all over "expert";
3. sorts the received rows by local expert and runs `ffn` with those group sizes (no group offset:
   `jax.lax.ragged_dot`'s group_offset is not implemented on GPU);
4. unsorts, returns the results by the inverse all_to_all and combines each token's k slots.
The result equals one device's, capacity drops included.
"""
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from linmoe.layers.router import combine, move_rows, sort_slots
from linmoe.parallel.mesh import BATCH_AXES, axis_size

EXPERT_AXIS = "expert"
# ffn(rows [R, d_model] sorted by local expert, local weights, group sizes [local experts]) -> [R, d_model];
# rows past the sum of the group sizes must come out zero.
ExpertFn = Callable[[jax.Array, Sequence[jax.Array], jax.Array], jax.Array]


def expert_parallel() -> bool:
  """True when the ambient mesh splits experts (its "expert" axis is larger than 1)."""
  return axis_size(EXPERT_AXIS) > 1


def token_axes() -> tuple[str, ...]:
  """The mesh axes the MoE layer splits its token rows over, major to minor."""
  names = jax.sharding.get_abstract_mesh().axis_names
  return tuple(a for a in (*BATCH_AXES, EXPERT_AXIS) if a in names)


def _segment_of(row: jax.Array, sizes: jax.Array) -> jax.Array:
  """Index of the segment holding each row when segments of `sizes` [S] are laid out in order; S past
  their sum."""
  ends = jnp.cumsum(sizes)  # jnp.searchsorted trips over shard_map's varying-axes check on JAX 0.10.2
  return jnp.sum(ends[None, :] <= row[:, None], axis=1, dtype=jnp.int32)


def _exclusive_cumsum(a: jax.Array, axis: int) -> jax.Array:
  return jnp.cumsum(a, axis=axis) - a


def _local_moe(tokens, experts, weights, params, *, ffn: ExpertFn, capacity: int | None, axes):
  """One token shard: tokens [n, D], experts and weights [n, k]; params [E / shards, ...] each.
  Returns ([n, D], the global fraction of dropped slots)."""
  shards, num_local = axis_size(EXPERT_AXIS), params[0].shape[0]
  num_slots = experts.size
  slots = sort_slots(experts, shards * num_local)
  sizes = slots.group_sizes
  if capacity is None:
    sent = sizes
  else:  # Earlier token shards' slots come first in each expert's global order.
    before = _exclusive_cumsum(jax.lax.all_gather(sizes, axes), 0)[jax.lax.axis_index(axes)]
    sent = jnp.clip(capacity - before, 0, sizes)
  sent_by_shard = sent.reshape(shards, num_local)
  start_in_buffer = _exclusive_cumsum(sent_by_shard, 1).reshape(-1)  # [E] first row in its buffer
  start_sorted = _exclusive_cumsum(sizes, 0)  # [E] first sorted position of each expert

  # Send buffer [shards, n * k, D]: row r for shard j is its local expert e's (r - start)-th kept slot;
  # slot s, kept, sits in buffer row `at`. Rows move by `move_rows`, whose gradients are gathers too.
  row = jnp.arange(num_slots)
  local = jax.vmap(_segment_of, in_axes=(None, 0))(row, sent_by_shard).reshape(-1)  # [shards * slots]
  filled = local < num_local
  expert = jnp.repeat(jnp.arange(shards), num_slots) * num_local + jnp.minimum(local, num_local - 1)
  position = start_sorted[expert] + jnp.tile(row, shards) - start_in_buffer[expert]
  slot = slots.order[jnp.minimum(position, num_slots - 1)]
  flat = experts.reshape(-1)
  rank = slots.rank[slots.inverse]  # [slots] rank within the expert, in slot order
  kept = rank < sent[flat]
  at = (flat // num_local) * num_slots + start_in_buffer[flat] + jnp.where(kept, rank, 0)
  send = move_rows(tokens, slot, filled, at, kept, experts.shape[1])

  received = jax.lax.all_to_all(send.reshape(shards, num_slots, -1), EXPERT_AXIS, 0, 0)
  counts = jax.lax.all_to_all(sent_by_shard, EXPERT_AXIS, 0, 0)  # [sources, local experts]
  local_of_row = jax.vmap(_segment_of, in_axes=(None, 0))(row, counts).reshape(-1)
  by_expert = jnp.argsort(local_of_row, stable=True)  # received rows grouped by local expert
  unsort = jnp.argsort(by_expert)
  xs = move_rows(received.reshape(send.shape), by_expert, None, unsort, None)
  ys = move_rows(ffn(xs, params, jnp.sum(counts, 0)), unsort, None, by_expert, None)
  returned = jax.lax.all_to_all(ys.reshape(received.shape), EXPERT_AXIS, 0, 0).reshape(send.shape)
  ys = move_rows(returned, at, kept, slot, filled)  # [slots, D]; dropped slots give zero
  dropped = jax.lax.psum(jnp.sum(sizes - sent), axes) / jax.lax.psum(num_slots, axes)
  return combine(ys, weights), dropped.astype(jnp.float32)


def expert_parallel_moe(tokens: jax.Array, experts: jax.Array, weights: jax.Array,
                        params: Sequence[jax.Array], ffn: ExpertFn,
                        capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Routed experts with the experts split over the ambient mesh's "expert" axis.

  Args:
    tokens: [tokens, d_model], in the experts' compute dtype.
    experts: [tokens, k] int32 chosen experts.
    weights: [tokens, k] combine weights.
    params: expert weights, each [experts, ...]; split over "expert".
    ffn: the experts' function on rows sorted by local expert (`ExpertFn`).
    capacity: slots each expert takes (in global token order), or None for dropless.

  Returns:
    [tokens, d_model] combined outputs, and the fraction of dropped slots (0 when dropless).
  """
  axes = token_axes()
  shards = 1
  for a in axes:
    shards *= axis_size(a)
  if params[0].shape[0] % axis_size(EXPERT_AXIS):
    raise ValueError(f"num_experts = {params[0].shape[0]} must be divisible by mesh.expert = "
                     f"{axis_size(EXPERT_AXIS)}")
  if tokens.shape[0] % shards:
    raise ValueError(f"batch * seq = {tokens.shape[0]} tokens must be divisible by the {shards} token "
                     f"shards of mesh axes {axes}")
  rows = P(axes)
  fn = jax.shard_map(
      lambda *a: _local_moe(*a, ffn=ffn, capacity=capacity, axes=axes),
      in_specs=(rows, rows, rows, tuple(P(EXPERT_AXIS) for _ in params)),
      out_specs=(rows, P()), axis_names=set(axes))
  return fn(tokens, experts, weights, tuple(params))
