"""The trainer: builds data, model, optimizer and mesh from a config and runs the training loop.

`train.py` is a thin CLI over `Trainer(config).train()`. A notebook can drive the same object step
by step: `state = trainer.init_state(); state, metrics = trainer.step(state, trainer.batch(0))`.
"""
import functools
import math
import os
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from linmoe import checkpoint
from linmoe.config import ModelConfig, padded_vocab_size, validate
from linmoe.data import build_data
from linmoe.metrics import MetricsWriter
from linmoe.model import LinearMoELM
from linmoe.optim import learning_rate_schedule, make_optimizer
from linmoe.parallel import rules
from linmoe.parallel.mesh import batch_sharding, bytes_per_device, make_mesh, put_global, replicated
from linmoe.steps import TrainState, eval_step, train_step


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient; the message names the step."""


def param_count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


class Trainer:
  """Everything one training run needs, built and validated from its config."""

  def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None):
    """`devices`: the mesh's devices (default: all of them, as train.py runs)."""
    devices = jax.devices() if devices is None else list(devices)
    validate(config, len(devices))
    self.config = config
    self.data = build_data(config.data, config.train.seq_len, config.seed)
    vocab_size = padded_vocab_size(config.model, self.data.tokenizer.vocab_size)
    self.model_cfg = ModelConfig.from_config(config.model, vocab_size)
    self.model = LinearMoELM(self.model_cfg)
    self.mesh = make_mesh(config.mesh, devices)
    self.tx = make_optimizer(config.train,
                             master_weights=config.model.moe.expert_param_dtype != "float32")
    # Shardings of the train state from the parameters' logical axis names (linmoe/parallel/rules.py):
    # parameters and optimizer moments alike, so FSDP shards both.
    boxed = jax.eval_shape(self._boxed_init, jax.random.key(config.seed))
    self.state_shardings = rules.shardings(boxed, self.mesh)
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       nn.meta.unbox(boxed), self.state_shardings)
    reset = config.data.reset_at_doc_boundary
    step_fn = functools.partial(train_step, model=self.model, cfg=self.model_cfg, tx=self.tx,
                                schedule=learning_rate_schedule(config.train), reset_at_doc_boundary=reset)
    data_sharding, params_sharding = batch_sharding(self.mesh), self.state_shardings.params
    self._train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, data_sharding),
                               out_shardings=(self.state_shardings, replicated(self.mesh)),
                               donate_argnums=0)
    self._eval_step = jax.jit(functools.partial(eval_step, model=self.model, reset_at_doc_boundary=reset),
                              in_shardings=(params_sharding, data_sharding),
                              out_shardings=replicated(self.mesh))

  def _boxed_init(self, rng: jax.Array) -> TrainState:
    """The initial state with parameters and optimizer moments still in their logical-axis boxes."""
    params = self.model.init(rng, jnp.zeros((1, self.model_cfg.chunk_size), jnp.int32))["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=self.tx.init(params),
                      nonfinite_step=jnp.int32(-1))

  def _init(self, rng: jax.Array) -> TrainState:
    return nn.meta.unbox(self._boxed_init(rng))

  def init_state(self) -> TrainState:
    """Fresh parameters from config.seed and a fresh optimizer state, sharded over the mesh."""
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init, out_shardings=self.state_shardings)(jax.random.key(self.config.seed))

  def batch(self, step: int) -> dict:
    """The training batch of step `step` (0-based), a pure function of (seed, step), sharded
    (data.loader = "index"; the Grain loader serves batches in order through `train_stream`)."""
    return self.put(self.data.train.batch(step, self.config.train.batch_size))

  def train_stream(self, state: dict | None = None):
    """The training batches from the first, or from a position saved with a checkpoint."""
    return self.data.train.stream(self.config.train.batch_size, state)

  def put(self, batch: dict, process_local: bool = False) -> dict:
    """A host batch of [batch, seq] arrays, sharded over the mesh's data axes: a global batch of which
    each process places the rows its devices hold, or (`process_local`) this process's rows."""
    sharding = batch_sharding(self.mesh)
    if process_local:
      return {k: jax.make_array_from_process_local_data(sharding, a) for k, a in batch.items()}
    return put_global(batch, sharding)

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One jitted optimizer step; `state` is donated."""
    with jax.set_mesh(self.mesh):
      return self._train_step(state, batch)

  def memory_report(self) -> str:
    """Parameter and optimizer-state bytes held by one device."""
    params, opt = (bytes_per_device(getattr(self.abstract_state, k)) for k in ("params", "opt_state"))
    return f"per device: {params / 2**20:.2f} MiB parameters + {opt / 2**20:.2f} MiB optimizer state"

  def evaluate(self, params) -> dict:
    """Held-out loss and perplexity over up to train.eval_batches batches."""
    loss_sum, tokens = 0.0, 0.0
    for batch in self.data.eval.eval_batches(self.config.train.batch_size,
                                             self.config.train.eval_batches):
      with jax.set_mesh(self.mesh):
        out = self._eval_step(params, put_global(batch, batch_sharding(self.mesh)))
      loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
    loss = loss_sum / tokens
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}

  def restore_or_init(self, manager, step: int | None = None) -> TrainState:
    """The checkpoint of `step` (default: the latest), restored straight into the state's shardings,
    or a fresh state when the workdir has none."""
    restored = checkpoint.restore(manager, self.abstract_state, step)
    return self.init_state() if restored is None else restored

  def train(self, until: int | None = None) -> TrainState:
    """Trains to step `until` (default train.steps), resuming from the workdir's last checkpoint.

    Logs every train.log_every steps, evaluates every train.eval_every steps, checkpoints every
    train.ckpt_every steps; each also happens at the last step. Raises NonFiniteLossError, after
    waiting for pending saves, when a step's loss or gradient is not finite; no checkpoint is written
    from that step on.
    """
    cfg, workdir = self.config.train, self.config.workdir
    until = cfg.steps if until is None else min(until, cfg.steps)
    if jax.process_index() == 0:  # one writer; the other processes log under <workdir>/process_<i>
      checkpoint.write_config(workdir, self.config)
    manager = checkpoint.checkpoint_manager(workdir, cfg.keep_checkpoints)
    state = self.restore_or_init(manager)
    start = int(state.step)
    data_state = checkpoint.restore_data_state(manager, start) if start else None
    if start and data_state is None:  # a checkpoint saved without a stream position
      data_state = {"step": start}  # the index loader's position; the Grain loader refuses it
    stream = self.train_stream(data_state)
    print(self.data.describe())
    print(f"model: {param_count(state.params):,} parameters, layers {self.model_cfg.layer_kinds} "
          f"(L = {self.model_cfg.lsm}), {self.model_cfg.moe.num_experts} experts")
    print(f"mesh: {dict(self.mesh.shape)}; {self.memory_report()}")
    if start:
      print(f"resumed from {os.path.join(workdir, 'checkpoints')} at step {start}")
    writer = MetricsWriter(workdir if jax.process_index() == 0 else os.path.join(
        workdir, f"process_{jax.process_index()}"), until, start)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_time, last_step = time.perf_counter(), start
    try:
      for step in range(start + 1, until + 1):
        state, metrics = self.step(state, self.put(next(stream), stream.process_local))
        writer.advance()
        is_end = step == until
        log, evaluate, save = (step % every == 0 or is_end for every in (
            cfg.log_every, cfg.eval_every, cfg.ckpt_every))
        if not (log or evaluate or save):
          continue
        self._check_finite(state, manager)
        if log:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          writer.write(step, {**metrics, "tokens_per_sec": (step - last_step) * tokens_per_step
                              / (now - last_time)})
          last_time, last_step = now, step
        if evaluate:
          writer.write(step, self.evaluate(state.params))
          last_time = time.perf_counter()
        if save:
          checkpoint.save(manager, step, state, stream.get_state())
    finally:
      manager.wait_until_finished()
      writer.close()
    return state

  def _check_finite(self, state: TrainState, manager) -> None:
    bad = int(state.nonfinite_step)
    if bad >= 0:
      manager.wait_until_finished()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {bad}; stopped. Parameters were not updated from "
          f"that step on; the last good checkpoint (step {manager.latest_step()}) is kept in "
          f"{os.path.join(self.config.workdir, 'checkpoints')}")
