"""Device mesh and shardings: one code path for 1 CPU, fake CPU devices, GPUs and TPU pods.

Everything is data parallel over a 1-D mesh axis named ``data``: batches are split along it,
parameters and optimizer state are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """Calls ``jax.distributed.initialize()`` only when asked (it hangs on a lone host otherwise)."""
  if enabled:
    jax.distributed.initialize()
  logging.info(
      "JAX process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices()[0].platform)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over all devices (or the first ``num_devices``, for tests)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def data_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch size") -> int:
  """Returns the per-process batch; raises if the global batch does not split evenly."""
  n = data_size(mesh)
  if global_batch <= 0 or global_batch % n:
    raise ValueError(
        f"{what} {global_batch} must be a positive multiple of the {n} devices on the "
        f"'{DATA_AXIS}' axis")
  return global_batch // jax.process_count()


def global_batch_from_local(local: Any, mesh: Mesh) -> Any:
  """Builds globally sharded arrays from each process's slice of the batch."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
