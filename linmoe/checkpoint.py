"""Orbax checkpoints in <workdir>/checkpoints, plus the run's config.json.

Each checkpoint holds two items: "state" (the train state) and "data" (the training batch stream's
position, a JSON dict; see linmoe/data/stream.py), so a resumed run reads on from the same batch.
"""
import json
import os

import ml_collections
import orbax.checkpoint as ocp

from linmoe.config import ConfigError, default_config


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None = None) -> None:
  """Saves asynchronously; orbax writes to a temporary folder and renames it when complete, so an
  interrupted save never replaces the last complete checkpoint."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores `step` (default: the latest) into the structure, dtypes and shardings of
  `abstract_state` (ShapeDtypeStructs with shardings: each process reads only its shards); returns
  None when the workdir has no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))["state"]


def restore_params(manager: ocp.CheckpointManager, step: int | None = None) -> tuple[dict, int] | None:
  """(parameters, step) of checkpoint `step` (default: the latest) as saved, on the default device,
  without building the optimizer state; None when the workdir has no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return state["params"], int(state["step"])


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The batch stream position saved with checkpoint `step`, or None if it has none."""
  if not os.path.isdir(os.path.join(manager.directory, str(step), "data")):
    return None
  return manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes <workdir>/config.json; refuses a workdir whose saved model differs from `config`'s."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    saved = read_config(workdir)
    if saved.model.to_dict() != config.model.to_dict():
      changed = sorted(k for k, v in config.model.items() if saved.model.get(k) != v)
      raise ConfigError(f"config error: workdir {workdir!r} holds a run of another model "
                        f"(model keys changed: {', '.join(changed)}); use a new workdir")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    f.write(config.to_json(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json over today's defaults, so keys added since the run take their defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
  with open(path) as f:
    config = default_config()
    config.update(json.load(f))
    return config
