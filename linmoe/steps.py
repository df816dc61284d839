"""The pure, jittable train and eval steps, and the train state they carry."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from linmoe.config import ModelConfig
from linmoe.model import uses_moe


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 []: optimizer steps done
  params: Any
  opt_state: Any
  nonfinite_step: jnp.ndarray  # int32 []: first step whose loss or gradient was not finite, else -1


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Per-token loss; logits [batch, seq, vocab], targets [batch, seq] -> [batch, seq]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def loss_fn(params, model: nn.Module, cfg: ModelConfig, batch: dict) -> tuple[jnp.ndarray, dict]:
  """Language-model loss plus the weighted MoE router losses; returns (total, metrics)."""
  logits, aux = model.apply({"params": params}, batch["inputs"])
  loss = jnp.mean(cross_entropy(logits, batch["targets"]))
  total = loss
  if uses_moe(cfg):
    total = total + cfg.moe.aux_loss_weight * aux["moe_lb_loss"] + cfg.moe.z_loss_weight * aux[
        "moe_z_loss"]
  return total, {"loss": loss, "total_loss": total, **aux}


def train_step(state: TrainState, batch: dict, *, model: nn.Module, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule
               ) -> tuple[TrainState, dict]:
  """One optimizer step. A non-finite loss or gradient leaves params and optimizer state unchanged
  and records the step in `nonfinite_step`, so the host can stop without a device sync every step."""
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, cfg, batch)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  step = state.step + 1
  nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, step, state.nonfinite_step)
  new_state = TrainState(step=step, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), nonfinite_step=nonfinite_step)
  return new_state, {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step)}


def eval_step(params, batch: dict, *, model: nn.Module) -> dict:
  """Summed token loss and token count of one batch."""
  logits, _ = model.apply({"params": params}, batch["inputs"], mode="eval")
  losses = cross_entropy(logits, batch["targets"])
  return {"loss_sum": jnp.sum(losses), "tokens": jnp.asarray(losses.size, jnp.float32)}
