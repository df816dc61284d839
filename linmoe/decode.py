"""Recurrent decoding: prefill a prompt with the parallel form, then one token at a time.

The cache holds, per LSM layer, its fp32 memory [batch, heads, dk, dv] (and short-convolution
context), whose size does not depend on the number of tokens seen; per attention layer, a KV cache of
`cache_len` positions.
"""
import jax
import jax.numpy as jnp

from linmoe.model import LinearMoELM


def prefill(model: LinearMoELM, params, tokens: jnp.ndarray,
            cache_len: int) -> tuple[jnp.ndarray, dict]:
  """tokens [batch, seq] -> (logits [batch, vocab] for the position after the prompt, cache after the
  last token). Only the last position reaches the output head."""
  last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)
  (logits, _), variables = model.apply({"params": params}, tokens, mode="prefill",
                                       cache_len=cache_len, mutable=["cache"], logits_at=last)
  return logits[:, 0], variables["cache"]


def decode_step(model: LinearMoELM, params, cache: dict,
                token: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
  """token [batch] -> (logits [batch, vocab] for the next position, updated cache)."""
  (logits, _), variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                       mode="decode", mutable=["cache"])
  return logits[:, 0], variables["cache"]


def cache_bytes(cache: dict) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
