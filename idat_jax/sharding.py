"""Device mesh and shardings: one code path for 1 CPU, fake CPU devices, GPUs and TPU pods.

Everything is data parallel over a 1-D mesh axis named ``data``: batches are split along it,
parameters and optimizer state are replicated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idat_jax.errors import ConfigError

DATA_AXIS = "data"

# Environment variables read when the matching config key is unset. JAX itself reads
# JAX_COORDINATOR_ADDRESS; the process count and id are set by scripts/launch_local.sh (and
# can be by any launcher). Left unset everywhere, JAX's cluster auto-detection fills them in
# (Cloud TPU, SLURM, Open MPI, GKE), which is the zero-argument call on a TPU VM slice.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

DISTRIBUTED_DEFAULTS = {
    "enabled": False,
    "coordinator_address": "",
    "num_processes": 0,
    "process_id": -1,
    "initialization_timeout_s": 300,
    "heartbeat_timeout_s": 60,
    "shutdown_timeout_s": 60,
    "cpu_collectives": "gloo",
}


def _distributed_options(config: Any) -> dict[str, Any]:
  """The ``distributed`` options from a bool (old configs), the sub-config or the whole config."""
  if isinstance(config, (bool, np.bool_)):
    return dict(DISTRIBUTED_DEFAULTS, enabled=bool(config))
  if hasattr(config, "distributed") and not isinstance(config, Mapping):
    return _distributed_options(config.distributed)
  if hasattr(config, "get") and "distributed" in config and "enabled" not in config:
    return _distributed_options(config["distributed"])
  if hasattr(config, "items"):
    unknown = set(config.keys()) - set(DISTRIBUTED_DEFAULTS)
    if unknown:
      raise ConfigError(f"unknown config.distributed keys {sorted(unknown)}; valid: "
                        f"{sorted(DISTRIBUTED_DEFAULTS)}")
    return dict(DISTRIBUTED_DEFAULTS, **dict(config.items()))
  raise TypeError(f"expected a bool or a config with 'distributed', got {type(config).__name__}")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_arguments(config: Any) -> dict[str, Any] | None:
  """Keyword arguments for ``jax.distributed.initialize``, or None for a single process.

  Distributed mode is on when ``config.distributed.enabled`` is set, or when a process count
  above 1 comes from the config or ``$JAX_NUM_PROCESSES`` (so a launcher alone switches it on).
  Each of coordinator address / process count / process id comes from the config, else from
  the environment, else stays None for JAX's cluster auto-detection.
  """
  o = _distributed_options(config)
  num_processes = o["num_processes"] if o["num_processes"] > 0 else _env_int(ENV_NUM_PROCESSES)
  if not o["enabled"] and not (num_processes or 0) > 1:
    return None
  process_id = o["process_id"] if o["process_id"] >= 0 else _env_int(ENV_PROCESS_ID)
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"config.distributed.process_id={process_id} is not in [0, {num_processes}) "
                      "(set it, or $JAX_PROCESS_ID, to this host's rank)")
  for key in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
    if o[key] <= 0:
      raise ConfigError(f"config.distributed.{key} must be > 0 seconds, got {o[key]}")
  return {
      "coordinator_address": (o["coordinator_address"] or os.environ.get(ENV_COORDINATOR)
                              or None),
      "num_processes": num_processes, "process_id": process_id,
      "initialization_timeout": int(o["initialization_timeout_s"]),
      "heartbeat_timeout_seconds": int(o["heartbeat_timeout_s"]),
      "shutdown_timeout_seconds": int(o["shutdown_timeout_s"])}


def initialize_distributed(config: Any) -> None:
  """Joins this process to a multi-process JAX run when the config or environment asks for one.

  ``config`` is the whole run config, its ``distributed`` block, or a bool (older configs).
  Call it before anything touches a device: the CPU collectives (gloo; CPU runs such as
  scripts/launch_local.sh) and the distributed client must be set before the backends start.
  A peer that stops sending heartbeats for ``heartbeat_timeout_s`` ends every other process
  with an error instead of a hang; ``initialization_timeout_s`` bounds the wait for all hosts
  to join.
  """
  kwargs = distributed_arguments(config)
  if kwargs is not None:
    collectives = _distributed_options(config)["cpu_collectives"]
    if collectives and collectives != "none":
      # Only the CPU client uses it; without it, cross-process computations on CPU fail.
      jax.config.update("jax_cpu_collectives_implementation", collectives)
    jax.distributed.initialize(**kwargs)
  logging.info(
      "JAX process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), jax.devices()[0].platform)


def process_tag() -> str:
  """``'-p<i>'`` in a multi-process run, else ``''``: for files every process writes into
  the same shared directory (e.g. error logs), so processes never overwrite each other's.
  Safe to call at any time (before initialization it is '' and starts no backend)."""
  if not jax.distributed.is_initialized():
    return ""
  return f"-p{jax.process_index()}"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over all devices (or the first ``num_devices``, for tests)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ConfigError(f"config.num_devices={num_devices}: only {len(devices)} devices exist")
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
    raise ConfigError(
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
