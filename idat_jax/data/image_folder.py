"""Image-folder backend for WeCoLoRA: class-per-subfolder trees with a few-shot subset.

WeCoLoRA's ``ImageFolderWithRatio`` keeps, per class, the first ``int(n * alpha)`` files after
``sklearn.utils.shuffle(fnames, random_state=12)`` of the *directory listing order*, so its
subset depends on the filesystem. Here the filenames are sorted first and then shuffled with the
same generator (``RandomState(seed)``, identical to sklearn's shuffle), so the subset is the
same on every filesystem, and at least one image per class is kept.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence, TypeVar

import numpy as np

from idat_jax.data import preprocess
from idat_jax.data.base import DataError, DataNotPreparedError, ImageLike, Source, stat_files

K = TypeVar("K")
DEFAULT_FEW_SHOT_SEED = 12  # WeCoLoRA's random_state


def few_shot_count(num: int, fraction: float) -> int:
  """int(num * fraction) (WeCoLoRA's floor), but at least one."""
  return max(1, int(num * fraction))


def few_shot_select(keys_by_class: Sequence[Sequence[K]], fraction: float,
                    seed: int = DEFAULT_FEW_SHOT_SEED,
                    class_names: Sequence[str] | None = None) -> list[list[K]]:
  """Class-balanced subset: per class sort, seeded shuffle, keep ``few_shot_count``, sort.

  Raises DataError for an empty class (naming it) or a fraction outside (0, 1].
  """
  if not 0.0 < fraction <= 1.0:
    raise DataError(f"few-shot fraction must be in (0, 1], got {fraction}")
  chosen = []
  for c, keys in enumerate(keys_by_class):
    keys = sorted(keys)
    if not keys:
      name = class_names[c] if class_names is not None else str(c)
      raise DataError(f"class {name!r} has no examples; every class needs at least one")
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)  # == sklearn.utils.shuffle(random_state=seed)
    keep = order[:few_shot_count(len(keys), fraction)]
    chosen.append([keys[i] for i in sorted(keep)])
  return chosen


def _list_images(class_dir: str) -> list[str]:
  """Image files under ``class_dir`` (recursively), as sorted relative paths."""
  found = []
  pending = [""]
  while pending:
    rel = pending.pop()
    with os.scandir(os.path.join(class_dir, rel)) as it:
      for entry in it:
        child = os.path.join(rel, entry.name) if rel else entry.name
        if entry.is_dir(follow_symlinks=True):
          pending.append(child)
        elif entry.name.lower().endswith(preprocess.IMAGE_EXTENSIONS):
          found.append(child)
  return sorted(found)


class ImageFolderSource(Source):
  """``<root>/<class>/**/<image>`` (ImageNet layout); labels are sorted class indices."""

  def __init__(self, root: str, fraction: float = 1.0, seed: int = DEFAULT_FEW_SHOT_SEED):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise DataNotPreparedError(f"image folder {self.root} does not exist")
    with os.scandir(self.root) as it:
      self.classes = sorted(e.name for e in it if e.is_dir(follow_symlinks=True))
    if not self.classes:
      raise DataError(f"image folder {self.root} has no class subdirectories "
                      "(expected <root>/<class>/<image>)")
    files = [_list_images(os.path.join(self.root, c)) for c in self.classes]
    for c, names in zip(self.classes, files):
      if not names:
        raise DataError(f"class directory {os.path.join(self.root, c)} holds no images "
                        f"(extensions {', '.join(preprocess.IMAGE_EXTENSIONS)})")
    chosen = few_shot_select(files, fraction, seed, self.classes)
    self.fraction, self.seed = fraction, seed
    self.paths = [os.path.join(c, p) for c, names in zip(self.classes, chosen) for p in names]
    self._labels = np.asarray(
        [label for label, names in enumerate(chosen) for _ in names], np.int32)
    self.num_classes = len(self.classes)
    self.name = f"image_folder:{self.root}"

  def __len__(self) -> int:
    return len(self.paths)

  def get(self, index: int) -> tuple[ImageLike, int]:
    path = os.path.join(self.root, self.paths[index])
    return preprocess.read_image(path), int(self._labels[index])

  def labels(self) -> np.ndarray:
    return self._labels.copy()

  def cache_parts(self) -> tuple[str, ...]:
    base = os.path.basename(os.path.normpath(self.root)) or "root"
    return ("image_folder", base, f"a{self.fraction:g}_s{self.seed}")

  def fingerprint(self) -> str:
    digest = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()
    return f"image_folder:{os.path.abspath(self.root)}:{len(self.paths)}:{digest}"

  def file_stamps(self) -> np.ndarray:
    return stat_files([os.path.join(self.root, p) for p in self.paths])
