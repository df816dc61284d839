"""Causal softmax attention with rotary positions (the `N` blocks of a hybrid pattern), with a KV cache."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.common import head_projection, output_projection, rotary
from linmoe.layers.mixer import Mixer, cache_variable
from linmoe.parallel import sequence


PACKED_FLASH_BLOCK = 128  # The sequence block of JAX's Pallas flash attention (`packed_flash_attention`).


def causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                     segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
  """Causal softmax attention over [batch, seq, heads, head_dim], within each document of segment_ids
  [batch, seq] | None.

  Without segment ids: cuDNN flash attention on a GPU for bf16/fp16 and head dims it takes (multiples
  of 8 up to 128), else XLA's (which forms the scores). With them, in those cases `packed_flash_attention`
  (its fp32 variant failed on the H100), elsewhere XLA's with the mask causal AND same document.
  `jax.nn.dot_product_attention` (JAX 0.10 / 0.11) has no segment argument: its cuDNN path turns a
  `mask` into a dense [batch, 1, seq, seq] bias.
  """
  head_dim = q.shape[-1]
  flash = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= 128)
  if segment_ids is not None:
    if flash:
      return packed_flash_attention(q, k, v, segment_ids)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [batch, 1, seq, seq]
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                      implementation="cudnn" if flash else None)


def packed_flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray,
                           interpret: bool = False) -> jnp.ndarray:
  """Causal attention within documents by JAX's Pallas (Triton) flash attention, which takes segment ids
  and never forms the [seq, seq] scores; [batch, seq, heads, head_dim] -> same.

  The kernel needs the sequence in whole blocks of PACKED_FLASH_BLOCK: the padding gets a segment id of
  its own (one past the largest), so no real query sees a padded key, and the padded queries are dropped.
  """
  from jax.experimental.pallas.ops.gpu import attention as flash_attention  # pylint: disable=g-import-not-at-top
  seq_len = q.shape[1]
  pad = -seq_len % PACKED_FLASH_BLOCK
  if pad:
    q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], constant_values=jnp.max(segment_ids) + 1)
  out = flash_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=q.shape[-1] ** -0.5,
                            causal=True, interpret=interpret)
  return out[:, :seq_len]


class CausalAttention(Mixer):
  """Multi-head causal attention; [batch, seq, d_model] -> [batch, seq, d_model].

  With the sequence split over the mesh ("train", "eval"), each shard's queries attend to the keys and
  values gathered from all shards (LASP-2H). In "prefill" the keys and values go to a cache of
  `cache_len` positions; in "decode" the token attends to the cached positions before it and its own.
  Tokens past the cache give NaN outputs. `segment_ids` [batch, seq] | None keeps each query to the keys
  of its document ("train" and "eval"; None in "prefill" and "decode": one document per row).
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    cfg = self.cfg
    batch, seq = x.shape[:2]
    offset = self.position_offset(seq)
    q = rotary(head_projection(cfg, "q_proj")(x), cfg.rope_theta, offset)  # [B, T, H, Dh]
    k = rotary(head_projection(cfg, "k_proj")(x), cfg.rope_theta, offset)
    v = head_projection(cfg, "v_proj")(x)
    if sequence.is_split(self.mode):  # LASP-2H
      return output_projection(cfg)(sequence.gathered_attention(q, k, v, segment_ids))
    if self.mode in ("train", "eval"):
      return output_projection(cfg)(causal_attention(q, k, v, segment_ids))
    if segment_ids is not None:
      raise ValueError(f"{self.mode} takes one document per row: segment_ids must be None")
    if not self.decoding and self.cache_len < seq:
      raise ValueError(f"cache_len {self.cache_len} cannot hold a prompt of {seq} tokens")
    empty = lambda: jnp.zeros((batch, self.cache_len, *k.shape[2:]), k.dtype)
    k_cache = cache_variable(self, self.mode, "keys", empty)
    v_cache = cache_variable(self, self.mode, "values", empty)
    k_cache.value = jax.lax.dynamic_update_slice_in_dim(k_cache.value, k, offset, axis=1)
    v_cache.value = jax.lax.dynamic_update_slice_in_dim(v_cache.value, v, offset, axis=1)
    capacity = k_cache.value.shape[1]
    if self.decoding:
      visible = jnp.arange(capacity) <= offset  # [capacity]
      o = jax.nn.dot_product_attention(q, k_cache.value, v_cache.value,
                                       mask=visible[None, None, None, :])
    else:
      o = causal_attention(q, k, v)
    overflow = offset + seq > capacity  # never a silently wrong answer: NaN past the cache
    return output_projection(cfg)(jnp.where(overflow, jnp.nan, o))
