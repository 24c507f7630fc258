"""Random images with a registered task's real split sizes and class count.

For measuring the speed of the whole protocol (``scripts/benchmark.py --protocol``, or any
config with ``data.backend='synthetic'``) where the real data is not on disk: every example
goes through the same cache, device-resident and evaluation paths as real data. There is
nothing to learn in these images; accuracies on them are chance.
"""

from __future__ import annotations

import zlib

import numpy as np

from idat_jax.data import vtab
from idat_jax.data.base import DataError, ImageLike, Source


class SyntheticTaskSource(Source):
  """Split ``split`` of ``task``: uint8 noise images of ``image_size``, balanced labels.

  Example ``i`` is a deterministic function of (task, split, i), so repeated reads and
  several processes agree; label ``i % num_classes``.
  """

  def __init__(self, task: str, split: str, image_size: int):
    spec = vtab.get_task(task)
    if image_size <= 0:
      raise DataError(f"synthetic images need a positive size, got {image_size}")
    self.task, self.split, self.image_size = spec.name, vtab.check_split(split), image_size
    self.num_examples = spec.split_size(split)
    self.num_classes = spec.num_classes
    self.name = f"synthetic/{spec.name}/{split}"
    self._seed = zlib.crc32(self.name.encode())

  def __len__(self) -> int:
    return self.num_examples

  def get(self, index: int) -> tuple[ImageLike, int]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.name}: index {index} outside [0, {self.num_examples})")
    rng = np.random.default_rng([self._seed, index])
    size = self.image_size
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8), index % self.num_classes

  def labels(self) -> np.ndarray:
    return (np.arange(self.num_examples) % self.num_classes).astype(np.int32)

  def cache_parts(self) -> tuple[str, ...] | None:
    return ("synthetic", self.task, self.split)
