"""What every sequence mixer (LSM layer or attention) shares: its config, depth and run mode.

Modes: "train" and "eval" (whole sequences, no cache; MoE capacity differs), "prefill" (whole sequences;
leaves the mixer's state in the "cache" variable collection) and "decode" (one token, [batch, 1, d_model];
reads and updates the cache).
Run the last two with `mutable=["cache"]` (linmoe/decode.py does).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.config import ModelConfig

MODES = ("train", "eval", "prefill", "decode")
CACHE = "cache"


def cache_variable(module: nn.Module, mode: str, name: str, init_fn) -> nn.Variable | None:
  """`module`'s cache variable `name` outside training (created by `init_fn()` in prefill)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return None if mode in ("train", "eval") else module.variable(CACHE, name, init_fn)


class Mixer(nn.Module):
  """Base of the mixers; `cache_len` is the token capacity of attention KV caches (0 in training)."""
  cfg: ModelConfig
  layer_idx: int | jax.Array  # depth in the stack; a traced int32 scalar in a scanned stack (model.Unit)
  mode: str = "train"
  cache_len: int = 0

  @property
  def decoding(self) -> bool:
    return self.mode == "decode"

  def position_offset(self, seq: int) -> jnp.ndarray | int:
    """Position of the first of `seq` incoming tokens (tracked in the cache outside training)."""
    index = cache_variable(self, self.mode, "index", lambda: jnp.int32(0))
    if index is None:
      return 0
    offset = index.value if self.decoding else 0
    index.value = jnp.asarray(offset + seq, jnp.int32)
    return offset
