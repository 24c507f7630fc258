"""Reading the Orbax checkpoint of a finished or running training run, without its config.

A run's checkpoint (written by ``idat_jax.training.checkpointing.Checkpointer``) holds two
items: ``state`` (trainable parameters, optimizer state, step) and ``meta`` (JSON facts about
the run). Other runs read it as weights, e.g. a distilled WeCoLoRA student for linear probing,
so the reader lives with the other weight-file readers, below the methods that use it.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from idat_jax import fileio


def item_handlers() -> dict[str, Any]:
  """The Orbax handlers of a run checkpoint's two items (shared by writer and reader)."""
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def read_run_checkpoint(directory: str,
                        step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(train state as NumPy arrays, JSON meta) of any run, without knowing its config.

  The target structure comes from the checkpoint's own metadata, restored onto one local
  device. ``step=None`` reads the latest step.
  """
  if not fileio.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  directory = fileio.abspath(directory)  # Orbax refuses relative paths
  manager = ocp.CheckpointManager(directory, item_handlers=item_handlers())
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
