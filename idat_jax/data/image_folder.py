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
from idat_jax.data.base import (DataError, DataNotPreparedError, ImageLike, Source,
                                 stat_files, walk_files)

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
  """Image files under ``class_dir`` (recursively; symlink loops skipped, counted), as sorted
  relative paths."""
  return walk_files(class_dir, lambda name: name.lower().endswith(preprocess.IMAGE_EXTENSIONS))


def folder_classes(root: str) -> list[str]:
  """The sorted class subdirectories of ``<root>/<class>/...`` (the class-to-index map)."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataNotPreparedError(f"image folder {root} does not exist")
  classes = []
  with os.scandir(root) as it:
    for e in it:
      try:
        if e.is_dir(follow_symlinks=True):
          classes.append(e.name)
      except OSError as err:  # a link to itself or a cycle of links
        raise DataError(f"image folder {root}: {e.name} is a symbolic link that does not "
                        f"resolve ({err.strerror}); remove it") from None
  if not classes:
    raise DataError(f"image folder {root} has no class subdirectories "
                    "(expected <root>/<class>/<image>)")
  return sorted(classes)


class ImageFolderSource(Source):
  """``<root>/<class>/**/<image>`` (ImageNet layout); labels are sorted class indices.

  ``classes``: the class-to-index map to use (the training split's, for an evaluation
  split); a class subdirectory outside it is an error. Without it, the folder's own classes.
  """

  def __init__(self, root: str, fraction: float = 1.0, seed: int = DEFAULT_FEW_SHOT_SEED,
               classes: Sequence[str] | None = None):
    self.root = os.fspath(root)
    present = folder_classes(self.root)
    if classes is None:
      self.classes = present
    else:
      self.classes = list(classes)
      unknown = sorted(set(present) - set(self.classes))
      if unknown:
        raise DataError(
            f"image folder {self.root}: class {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f" is not a class of the training split ({len(self.classes)} classes); labels "
            "would not match the trained head. Remove it, or add it to the training split")
    index = {c: i for i, c in enumerate(self.classes)}
    files = [_list_images(os.path.join(self.root, c)) for c in present]
    for c, names in zip(present, files):
      if not names:
        raise DataError(f"class directory {os.path.join(self.root, c)} holds no images "
                        f"(extensions {', '.join(preprocess.IMAGE_EXTENSIONS)})")
    chosen = few_shot_select(files, fraction, seed, present)
    self.fraction, self.seed = fraction, seed
    self.paths = [os.path.join(c, p) for c, names in zip(present, chosen) for p in names]
    self._labels = np.asarray(
        [index[c] for c, names in zip(present, chosen) for _ in names], np.int32)
    self.num_classes = len(self.classes)
    self.name = f"image_folder:{self.root}"
    self._class_map = ("" if self.classes == present else ":classes=" + hashlib.sha1(
        "\n".join(self.classes).encode()).hexdigest()[:16])

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
    # The class map enters only when it is not the folder's own: existing caches stay valid.
    return (f"image_folder:{os.path.abspath(self.root)}:{len(self.paths)}:{digest}"
            f"{self._class_map}")

  def file_stamps(self) -> np.ndarray:
    return stat_files([os.path.join(self.root, p) for p in self.paths])
