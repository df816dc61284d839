"""Mixture-of-Memories (Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories").

A layer holds `model.mom.num_memories` independent memories, each a full layer of the inner LSM
(`model.mom.inner`: its own projections, recurrence state, norm and output projection). A router sends
each token to its top-k memories; a memory the token is not routed to neither decays nor updates at that
token (its key-side inputs are zeroed, see `Family.gated_inputs`), and the memories' outputs are mixed
with the renormalized router weights. An optional shared memory sees every token and is added unweighted.

Simplification: each memory has its own query projection (the paper shares q); the memory router adds
no load-balancing loss.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from linmoe.layers.mixer import Mixer
from linmoe.parallel.rules import dense_init


class MixtureOfMemories(Mixer):
  """[batch, seq, d_model] -> [batch, seq, d_model]; segment_ids [batch, seq] | None reach every memory
  (the router reads one token at a time and needs none)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    from linmoe.layers import LSM_LAYERS  # the registry imports this module
    mom = self.cfg.mom
    inner = LSM_LAYERS[mom.inner]
    logits = nn.Dense(mom.num_memories, use_bias=False, dtype=jnp.float32,
                      kernel_init=dense_init("embed", "memories"), name="router")(
        x.astype(jnp.float32))  # [B, T, M]
    weights, chosen = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), mom.top_k)  # [B, T, k]
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    # Per-memory weight [B, T, M]: the router weight where routed, else 0.
    per_memory = jnp.sum(jax.nn.one_hot(chosen, mom.num_memories) * weights[..., None], axis=-2)
    y = 0.0
    for m in range(mom.num_memories):
      routed = (per_memory[..., m] > 0).astype(jnp.float32)
      out = inner(self.cfg, self.layer_idx, self.mode, name=f"memory_{m}")(x, segment_ids, memory_mask=routed)
      y = y + per_memory[..., m, None].astype(out.dtype) * out
    if mom.shared_memory:
      y = y + inner(self.cfg, self.layer_idx, self.mode, name="shared_memory")(x, segment_ids)
    return y
