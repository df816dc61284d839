"""AdamW with linear warmup, cosine decay and global-norm clipping."""
import jax
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


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask))
