"""Orbax checkpoints of the train state (trainable params, optimizer state, step) + JSON meta.

Frozen backbones are not saved: they are re-read from their pretrained files, as big_vision's
distillation trainer does for its teachers. Restores always go through abstract
``ShapeDtypeStruct`` targets that carry the *current* shardings, so a checkpoint written on
8 devices restores on 1 (and vice versa).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Sharding


def _item_handlers() -> dict[str, Any]:
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def abstract_like(tree: Any, sharding: Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with items ``state`` and ``meta``."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, create: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_item_handlers())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def read_run_checkpoint(directory: str,
                        step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(train state as NumPy arrays, JSON meta) of any run, without knowing its config.

  Used to read another run's weights (e.g. a distilled student for linear probing): the
  target structure comes from the checkpoint's own metadata, restored onto one local device.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  manager = ocp.CheckpointManager(directory, item_handlers=_item_handlers())
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint (step {step}) in {directory}; available: "
                              f"{list(manager.all_steps())}")
    metadata = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return jax.device_get(restored["state"]), dict(restored["meta"] or {})
  finally:
    manager.close()
