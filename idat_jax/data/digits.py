"""scikit-learn's handwritten digits as a VTAB-style folder task (real data, no download).

``load_digits()`` holds 1,797 8x8 grey images with pixel values 0..16; they are scaled to
0..255 and saved as PNG in the NOAH/SSF layout, so the demo and tests exercise the exact
reader used for VTAB-1K. ``train800val200`` has ``train_size`` images (class-stratified,
seeded), ``train800``/``val200`` are its first 80% / last 20%, ``test`` is everything else.
The demo pretrains on digits 0-4 and tunes on 5-9 by writing two tasks with ``classes``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

import numpy as np
from PIL import Image

from idat_jax.data.base import DataError
from idat_jax.data.folder import TASK_METADATA
from idat_jax.fileio import atomic_write

SOURCE = "sklearn.datasets.load_digits"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DigitsTask:
  task_dir: str
  name: str
  classes: tuple[int, ...]  # original digits; label i is classes[i]
  counts: dict[str, int]

  @property
  def num_classes(self) -> int:
    return len(self.classes)


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 8, 8) uint8 images (0..16 scaled to 0..255) and int labels of load_digits()."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  return images, digits.target.astype(np.int64)


def _stratified_take(labels: np.ndarray, pool: np.ndarray, k: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits ``pool`` into k taken / rest with per-class counts proportional to the pool."""
  classes = np.unique(labels[pool])
  by_class = {c: rng.permutation(pool[labels[pool] == c]) for c in classes}
  exact = np.array([k * len(by_class[c]) / len(pool) for c in classes])
  quota = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - quota), kind="stable")[:k - quota.sum()]:
    quota[i] += 1
  taken = np.concatenate([by_class[c][:q] for c, q in zip(classes, quota)])
  rest = np.concatenate([by_class[c][q:] for c, q in zip(classes, quota)])
  return rng.permutation(taken), np.sort(rest)


def _expected_meta(name: str, classes: tuple[int, ...], train_size: int, seed: int,
                   counts: dict[str, int]) -> dict:
  return {"name": name, "source": SOURCE, "format_version": FORMAT_VERSION,
          "classes": list(classes), "num_classes": len(classes), "train_size": train_size,
          "seed": seed, "counts": counts}


def _is_complete(task_dir: str, meta: dict) -> bool:
  path = os.path.join(task_dir, TASK_METADATA)
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    if json.load(f) != meta:
      return False
  for split, count in meta["counts"].items():
    list_file = os.path.join(task_dir, f"{split}.txt")
    if not os.path.isfile(list_file):
      return False
    with open(list_file, encoding="utf-8") as f:
      lines = [line.split() for line in f if line.strip()]
    if len(lines) != count or not all(
        os.path.isfile(os.path.join(task_dir, parts[0])) for parts in lines):
      return False
  return True


def write_digits_task(root: str, name: str = "digits", classes: Iterable[int] = range(10),
                      train_size: int = 1000, seed: int = 0) -> DigitsTask:
  """Writes (or finds already written) the digits task at ``<root>/<name>``.

  Labels are remapped to ``0..len(classes)-1`` in the order of ``classes``. Idempotent: an
  existing consistent task is left untouched; a stale digits task (other arguments) is
  rewritten; any other directory of that name is an error.
  """
  classes = tuple(int(c) for c in classes)
  if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
    raise DataError(f"classes must be distinct digits 0..9, got {classes}")
  images, targets = digits_uint8()
  pool = np.nonzero(np.isin(targets, classes))[0]
  remap = {c: i for i, c in enumerate(classes)}
  labels = np.asarray([remap.get(int(t), -1) for t in targets])
  if not len(classes) <= train_size < len(pool):
    raise DataError(f"train_size {train_size} must be in [{len(classes)}, {len(pool)}) for "
                    f"classes {classes} ({len(pool)} images)")
  rng = np.random.default_rng(seed)
  train, test = _stratified_take(labels, pool, train_size, rng)
  n800 = int(round(0.8 * train_size))
  train800, val200 = train[:n800], train[n800:]
  splits = {"train800": train800, "val200": val200, "test": test}
  counts = {"train800": len(train800), "val200": len(val200),
            "train800val200": len(train), "test": len(test)}
  meta = _expected_meta(name, classes, train_size, seed, counts)

  root = os.fspath(root)
  task_dir = os.path.join(root, name)
  result = DigitsTask(task_dir=task_dir, name=name, classes=classes, counts=counts)
  if _is_complete(task_dir, meta):
    return result
  if os.path.exists(task_dir):
    old_meta = os.path.join(task_dir, TASK_METADATA)
    is_digits = False
    if os.path.isfile(old_meta):
      with open(old_meta, encoding="utf-8") as f:
        is_digits = json.load(f).get("source") == SOURCE
    if not is_digits:
      raise DataError(f"{task_dir} exists and is not a digits task written by "
                      "write_digits_task; choose another root or name")
  # Written under a temporary name and renamed, so a crash never leaves a half-written task;
  # if a concurrent writer finishes first, its (identical) task is kept.
  with atomic_write(task_dir, directory=True,
                    accept_existing=lambda path: _is_complete(path, meta)) as tmp:
    lines = {}
    for split, indices in splits.items():
      os.makedirs(os.path.join(tmp, "images", split))
      lines[split] = []
      for i, index in enumerate(indices):
        rel = f"images/{split}/{i:06d}.png"
        Image.fromarray(images[index], "L").save(os.path.join(tmp, rel))
        lines[split].append(f"{rel} {labels[index]}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
      with open(os.path.join(tmp, f"{split}.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(split_lines) + "\n")
    with open(os.path.join(tmp, TASK_METADATA), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
  return result
