"""AdamW with linear warmup, cosine decay and global-norm clipping; fp32 master weights for parameters
stored in lower precision."""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
      decay_steps=max(train.steps, train.warmup_steps + 1), end_value=train.lr * train.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only (not on norms, biases or gate vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


class MasterWeightsState(NamedTuple):
  master: Any  # fp32 copies of the parameters stored in lower precision; optax.MaskedNode for fp32 ones
  inner: optax.OptState


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _to_fp32(tree: Any) -> Any:
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _master_copy(param: Any) -> Any:
  """An fp32 copy of a low-precision parameter (keeping its logical-axis box), MaskedNode if fp32."""
  if nn.meta.unbox(param).dtype == jnp.float32:
    return optax.MaskedNode()
  return _to_fp32(param)


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run in fp32 on master copies of the parameters stored in lower precision (bf16 expert
  weights): the state holds those copies, the gradients are cast to fp32, and a low-precision
  parameter's update is its new master value minus the parameter, so that optax.apply_updates
  (p + u cast to p's dtype) stores the new master rounded to p's dtype. fp32 parameters are updated by
  `inner` as without the wrapper."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  def init(params):
    master = jax.tree.map(_master_copy, params, is_leaf=is_box)
    return MasterWeightsState(master, inner.init(_to_fp32(params)))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_master_weights needs the parameters in update()")
    full = jax.tree.map(lambda m, p: p.astype(jnp.float32) if _is_masked(m) else m, state.master, params,
                        is_leaf=_is_masked)
    updates, inner_state = inner.update(_to_fp32(grads), state.inner, full)
    new = optax.apply_updates(full, updates)
    master = jax.tree.map(lambda m, n: m if _is_masked(m) else n, state.master, new, is_leaf=_is_masked)
    updates = jax.tree.map(lambda m, u, n, p: u if _is_masked(m) else n - p.astype(jnp.float32),
                           state.master, updates, new, params, is_leaf=_is_masked)
    return updates, MasterWeightsState(master, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(train: ml_collections.ConfigDict, master_weights: bool = False
                   ) -> optax.GradientTransformation:
  """AdamW with warmup, cosine decay and clipping; `master_weights`: wrapped in `with_master_weights`
  (for parameters stored in bf16, `model.moe.expert_param_dtype`)."""
  tx = optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask))
  return with_master_weights(tx) if master_weights else tx
