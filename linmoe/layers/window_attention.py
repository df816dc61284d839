"""Causal sliding-window softmax attention with a decode cache of `window` keys and values.

Each token attends to itself and the window - 1 tokens before it. Sequences run blocked (blocks of `window`
queries against their own and the previous block: O(seq * window) work and memory); decoding keeps only the
last `window` keys and values in the "cache" collection, a fixed size whatever the context length.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.mixer import cache_variable
from linmoe.parallel import sequence


def sliding_window_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int,
                             start: jnp.ndarray | int = 0,
                             segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
  """Softmax attention of token t over tokens max(t - window + 1, start) .. t of its document.

  Args:
    q, k, v: [batch, seq, heads, dim].
    window: number of keys each query sees (itself included), >= 1.
    start: index of the first real key (the ones before are padding); queries before it see nothing.
    segment_ids: [batch, seq] int32 | None, the document of each token; None: one document per row.
  Returns:
    [batch, seq, heads, dim] in v's dtype.
  """
  batch, seq, heads, dim = q.shape
  n_blocks = -(-seq // window)

  def blocked(t):  # [batch, seq, ...] -> [batch, n_blocks, window, ...], zero-padded
    t = jnp.pad(t, [(0, 0), (0, n_blocks * window - seq)] + [(0, 0)] * (t.ndim - 2))
    return t.reshape(batch, n_blocks, window, *t.shape[2:])

  def with_previous_block(t):  # [batch * n_blocks, 2 * window, ...]
    blocks = blocked(t)
    previous = jnp.pad(blocks, [(0, 0), (1, 0)] + [(0, 0)] * (blocks.ndim - 2))[:, :-1]
    return jnp.concatenate([previous, blocks], axis=2).reshape(batch * n_blocks, 2 * window, *t.shape[2:])

  # Query i of block b sits at b * window + i, key j of its pair of blocks at (b - 1) * window + j.
  i, j = jnp.arange(window)[:, None], jnp.arange(2 * window)[None, :]
  in_window = (j > i) & (j <= i + window)  # [window, 2 * window]
  key_index = (jnp.arange(n_blocks)[:, None, None] - 1) * window + j
  mask = in_window & (key_index >= start)  # [n_blocks, window, 2 * window]
  mask = jnp.broadcast_to(mask, (batch, *mask.shape)).reshape(batch * n_blocks, window, 2 * window)
  if segment_ids is not None:
    query_ids = blocked(segment_ids).reshape(batch * n_blocks, window)
    mask = mask & (query_ids[:, :, None] == with_previous_block(segment_ids)[:, None, :])
  q = blocked(q).reshape(batch * n_blocks, window, heads, dim)
  o = jax.nn.dot_product_attention(q, with_previous_block(k), with_previous_block(v), mask=mask[:, None])
  return o.reshape(batch, n_blocks * window, heads, dim)[:, :seq]


class SlidingWindowAttention(nn.Module):
  """[batch, seq, heads, dim] q, k, v (positions already applied) -> [batch, seq, heads, dim].

  "prefill" leaves the last `window` keys and values in the cache (zeros before the first token);
  "decode" (one token) drops the oldest, appends the new one and masks the slots before position 0.
  With the sequence split over the mesh ("train", "eval"), each shard gets the window - 1 keys and
  values (and their segment ids) before it from the previous shard. `segment_ids` [batch, seq] | None
  keeps each token to its document (None in "prefill" and "decode": one document per row).
  """
  mode: str
  window: int

  @nn.compact
  def __call__(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
               offset: jnp.ndarray | int, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    batch, _, heads, dim = k.shape
    empty = lambda: jnp.zeros((batch, self.window, heads, dim), k.dtype)
    keys = cache_variable(self, self.mode, "keys", empty)
    values = cache_variable(self, self.mode, "values", empty)
    if sequence.is_split(self.mode):
      return sequence.with_left_context(self.attend_with_context,
                                        (jnp.concatenate([k, v], axis=-1), segment_ids), self.window - 1,
                                        split=(q,))
    if self.mode == "decode":
      k = jnp.concatenate([keys.value[:, 1:], k], axis=1)  # slot s holds position offset - window + 1 + s
      v = jnp.concatenate([values.value[:, 1:], v], axis=1)
      keys.value, values.value = k, v
      visible = jnp.arange(self.window) >= self.window - 1 - offset
      return jax.nn.dot_product_attention(q, k, v, mask=visible[None, None, None, :])
    if keys is not None:
      keys.value = jnp.concatenate([empty(), k], axis=1)[:, -self.window:]
      values.value = jnp.concatenate([empty(), v], axis=1)[:, -self.window:]
    return sliding_window_attention(q, k, v, self.window, segment_ids=segment_ids)

  def attend_with_context(self, kv_ids: tuple, start: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """Queries [batch, seq, heads, dim] over keys and values [batch, window - 1 + seq, heads, 2 * dim]
    and their segment ids [batch, window - 1 + seq] | None (the previous window - 1 tokens first; real
    from `start`)."""
    kv, segment_ids = kv_ids
    k, v = jnp.split(kv, 2, axis=-1)
    context = kv.shape[1] - q.shape[1]
    q = jnp.pad(q, [(0, 0), (context, 0), (0, 0), (0, 0)])
    return sliding_window_attention(q, k, v, self.window, start, segment_ids)[:, context:]
