"""One entry point for the trainer: a VTAB task split from either backend."""

from __future__ import annotations

import numpy as np

from idat_jax.data import cache, vtab
from idat_jax.data.base import DataError, Source
from idat_jax.data.folder import FolderTaskSource
from idat_jax.data.tfds_backend import TfdsTaskSource

BACKENDS = ("tfds", "folder")


def open_task_split(task: str, split: str = vtab.DEFAULT_TRAIN_SPLIT, *, backend: str = "folder",
                    data_dir: str | None = None, num_classes: int | None = None) -> Source:
  """A random-access source of one split of a task.

  ``backend='tfds'``: ``data_dir`` is the TFDS data dir (None: $TFDS_DATA_DIR or
  ~/tensorflow_datasets). ``backend='folder'``: ``data_dir`` is the root holding
  ``<task>/<split>.txt`` (NOAH/SSF layout); ``num_classes`` is needed only for unregistered
  tasks without ``task.json``.
  """
  if backend == "tfds":
    return TfdsTaskSource(task, split, data_dir)
  if backend == "folder":
    if not data_dir:
      raise DataError("the folder backend needs data_dir: the root of <task>/<split>.txt")
    return FolderTaskSource(data_dir, task, split, num_classes=num_classes)
  raise DataError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def load_task_split(task: str, split: str = vtab.DEFAULT_TRAIN_SPLIT, *, backend: str = "folder",
                    data_dir: str | None = None, image_size: int = 224,
                    cache_dir: str | None = None, num_workers: int | None = None,
                    num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Host arrays of a whole split: uint8 (N, S, S, 3) resized directly, int32 labels."""
  source = open_task_split(task, split, backend=backend, data_dir=data_dir,
                           num_classes=num_classes)
  return cache.load_arrays(source, image_size, cache_dir=cache_dir, num_workers=num_workers)
