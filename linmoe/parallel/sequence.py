"""Sequence parallelism over the "sequence" mesh axis: when it applies, the per-shard map, and the
collectives the layers need across shard borders (LASP-2H attention, left context for convolutions).

Activations are [batch, seq, ...] with seq split into S contiguous shards of seq / S tokens (shard r
holds tokens r * seq / S ..). Only "train" and "eval" run split; "prefill" and "decode" keep whole
sequences. The functions here read the mesh of the surrounding `jax.set_mesh` context; the other mesh
axes stay automatic inside the per-shard map (`shard_map` over "sequence" only).
"""
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from linmoe.parallel.mesh import axis_size

AXIS = "sequence"
SPLIT_MODES = ("train", "eval")
SPLIT = P(None, AXIS)  # [batch, seq, ...] with seq split
WHOLE = P()  # the same array on every shard


def shards() -> int:
  """Number of sequence shards S in the current mesh context (1 without one)."""
  return axis_size(AXIS)


def is_split(mode: str) -> bool:
  """True when a layer running in `mode` sees sequences split over the "sequence" axis."""
  return mode in SPLIT_MODES and shards() > 1


def check_divisible(seq_len: int) -> None:
  """Raises ValueError unless the sequence axis divides seq_len."""
  if seq_len % shards():
    raise ValueError(f"sequence length {seq_len} is not divisible by the 'sequence' mesh axis "
                     f"({shards()} shards)")


def per_shard(fn: Callable, in_specs: tuple, out_specs) -> Callable:
  """`fn` run on each sequence shard (`shard_map` over "sequence"; SPLIT / WHOLE specs).

  Without JAX's check of which values vary over shards: the ops' scans start from fresh zero states
  that the check would require marking as varying. Every output here is split (never WHOLE), and the
  gradient of a WHOLE input sums over the shards, as it should.
  """
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names={AXIS}, check_vma=False)


def shard_index() -> jax.Array:
  """Index r of this shard (inside `per_shard`)."""
  return jax.lax.axis_index(AXIS)


def gather(x: jax.Array, axis: int | None = None) -> jax.Array:
  """All shards' x (inside `per_shard`): stacked on a new leading axis [S, ...] when axis is None,
  else concatenated along `axis`."""
  if axis is None:
    return jax.lax.all_gather(x, AXIS)
  return jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)


def left_context(x: jax.Array, width: int) -> jax.Array:
  """The `width` tokens before this shard (inside `per_shard`): [batch, width, ...] from the end of the
  previous shard's x [batch, seq / S, ...]; zeros on the first shard."""
  if width > x.shape[1]:
    raise ValueError(f"a left context of {width} tokens needs at least that many per sequence shard, "
                     f"got {x.shape[1]}")
  n = shards()
  return jax.lax.ppermute(x[:, x.shape[1] - width:], AXIS, [(r, r + 1) for r in range(n - 1)])


def with_left_context(fn: Callable, x, width: int, split: tuple = (), whole: tuple = ()) -> jax.Array:
  """fn(concat(left context, x), start, *split, *whole) per shard, for causal maps that read `width`
  earlier tokens; start is `width` on the first shard (its context is zeros, not tokens), else 0.

  Args:
    fn: maps [batch, width + seq / S, ...] (a pytree of them when x is one), start, the split args'
      shards and the whole args to [batch, seq / S, ...].
    x: [batch, seq, ...], split over "sequence", or a pytree of such arrays (e.g. values and their
      segment ids), each given its left context.
    width: tokens of left context each shard needs (<= seq / S).
    split: more [batch, seq, ...] arrays, split as x (no context).
    whole: arrays every shard sees whole (e.g. a kernel).
  Returns:
    [batch, seq, ...], split over "sequence".
  """
  check_divisible(jax.tree.leaves(x)[0].shape[1])

  def body(x, split, whole):
    start = jnp.where(shard_index() == 0, width, 0)
    full = jax.tree.map(lambda a: jnp.concatenate([left_context(a, width), a], axis=1), x)
    return fn(full, start, *split, *whole)

  specs = (jax.tree.map(lambda _: SPLIT, x), (SPLIT,) * len(split), (WHOLE,) * len(whole))
  return per_shard(body, specs, SPLIT)(x, tuple(split), tuple(whole))


def gathered_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                       segment_ids: jax.Array | None = None) -> jax.Array:
  """LASP-2H causal softmax attention: each shard's queries against all keys and values (and their
  segment ids), gathered once.

  Args:
    q, k, v: [batch, seq, heads, dim], split over "sequence" (positions already applied).
    segment_ids: [batch, seq] int32 | None, split as q: a query sees only keys of its document.
  Returns:
    [batch, seq, heads, dim] in v's dtype, split over "sequence".
  """
  check_divisible(q.shape[1])

  ids = () if segment_ids is None else (segment_ids,)

  def body(q, k, v, ids):
    k, v = gather(k, axis=1), gather(v, axis=1)  # [batch, seq, heads, dim]
    query_pos = shard_index() * q.shape[1] + jnp.arange(q.shape[1])
    mask = (query_pos[:, None] >= jnp.arange(k.shape[1])[None, :])[None, None]  # [1, 1, seq / S, seq]
    if ids:  # same document: [batch, 1, seq / S, seq]
      mask = mask & (ids[0][:, None, :, None] == gather(ids[0], axis=1)[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  return per_shard(body, (SPLIT, SPLIT, SPLIT, (SPLIT,) * len(ids)), SPLIT)(q, k, v, ids)
