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


def document_ids(batch: dict, reset_at_doc_boundary: bool) -> jnp.ndarray | None:
  """The batch's "segment_ids" [batch, seq] for the model when documents are kept apart, else None (as
  for a batch without them: one document per row)."""
  return batch.get("segment_ids") if reset_at_doc_boundary else None


def loss_fn(params, model: nn.Module, cfg: ModelConfig, batch: dict,
            reset_at_doc_boundary: bool = True) -> tuple[jnp.ndarray, dict]:
  """Language-model loss plus the weighted MoE router losses; returns (total, metrics)."""
  logits, aux = model.apply({"params": params}, batch["inputs"],
                            segment_ids=document_ids(batch, reset_at_doc_boundary))
  loss = jnp.mean(cross_entropy(logits, batch["targets"]))
  total = loss
  if uses_moe(cfg):
    total = total + cfg.moe.aux_loss_weight * aux["moe_lb_loss"] + cfg.moe.z_loss_weight * aux[
        "moe_z_loss"]
  return total, {"loss": loss, "total_loss": total, **aux}


def train_step(state: TrainState, batch: dict, *, model: nn.Module, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               reset_at_doc_boundary: bool = True) -> tuple[TrainState, dict]:
  """One optimizer step. A non-finite loss or gradient leaves params and optimizer state unchanged
  and records the step in `nonfinite_step`, so the host can stop without a device sync every step.
  With `reset_at_doc_boundary` the model keeps the batch's documents (its "segment_ids") apart."""
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, cfg, batch,
                                                                  reset_at_doc_boundary)
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


def eval_step(params, batch: dict, *, model: nn.Module, reset_at_doc_boundary: bool = True) -> dict:
  """Summed token loss and token count of one batch (documents kept apart as in `train_step`)."""
  logits, _ = model.apply({"params": params}, batch["inputs"], mode="eval",
                          segment_ids=document_ids(batch, reset_at_doc_boundary))
  losses = cross_entropy(logits, batch["targets"])
  return {"loss_sum": jnp.sum(losses), "tokens": jnp.asarray(losses.size, jnp.float32)}
