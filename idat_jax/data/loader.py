"""One entry point for the trainer: a task split from any registered backend."""

from __future__ import annotations

import numpy as np

import os

from sklearn.model_selection import train_test_split

from idat_jax.data import cache, vtab
from idat_jax.data.base import DataError, Source, SubsetSource
from idat_jax.data.folder import FolderTaskSource
from idat_jax.data.image_folder import DEFAULT_FEW_SHOT_SEED, ImageFolderSource, folder_classes
from idat_jax.data.synthetic import SyntheticTaskSource
from idat_jax.data.tfds_backend import TfdsImageSource, TfdsTaskSource

BACKENDS = ("tfds", "folder", "image_folder", "tfds_images", "synthetic", "chestxray",
            "multilabel_csv")
# Backends whose labels are packed multi-hot masks (idat_jax.data.multilabel_csv).
MULTILABEL_BACKENDS = ("chestxray", "multilabel_csv")
STRATIFIED_SIDES = ("train", "test")


def stratified_split(source: Source, train_fraction: float, side: str, seed: int = 0) -> Source:
  """One side of a class-stratified train/test split of ``source``.

  sklearn's ``train_test_split(range(n), train_size=fraction, stratify=labels,
  random_state=seed)``: WeCoLoRA's RESISC45 protocol (10% train / 90% test, seed 0).
  """
  if not 0.0 < train_fraction < 1.0:
    raise DataError(f"stratified train fraction must be in (0, 1), got {train_fraction}")
  if side not in STRATIFIED_SIDES:
    raise DataError(f"stratified split side must be one of {STRATIFIED_SIDES}, got {side!r}")
  labels = source.labels()
  train, test = train_test_split(np.arange(len(source)), train_size=train_fraction,
                                 stratify=labels, random_state=seed)
  chosen = np.sort(train if side == "train" else test)
  return SubsetSource(source, chosen, f"{source.name}/stratified{train_fraction:g}-{side}-{seed}")


def image_folder_root(data_dir: str, split: str) -> str:
  """``<data_dir>/<split>`` if it exists, else ``data_dir`` (one folder for every split)."""
  root = os.path.join(data_dir, split)
  return root if os.path.isdir(root) else data_dir


def open_task_split(task: str, split: str = vtab.DEFAULT_TRAIN_SPLIT, *, backend: str = "folder",
                    data_dir: str | None = None, num_classes: int | None = None,
                    few_shot: float = 1.0, few_shot_seed: int = DEFAULT_FEW_SHOT_SEED,
                    image_size: int = 224, train_split: str | None = None) -> Source:
  """A random-access source of one split of a task.

  ``train_split``: the split that defines the classes (folder and image_folder backends). An
  evaluation split is numbered by its class map, and a class it lacks is an error.

  * ``tfds``: a VTAB-1K task; ``data_dir`` is the TFDS data dir (None: $TFDS_DATA_DIR or
    ~/tensorflow_datasets).
  * ``folder``: ``data_dir`` is the root holding ``<task>/<split>.txt`` (NOAH/SSF layout);
    ``num_classes`` is needed only for unregistered tasks without ``task.json``.
  * ``image_folder``: ``<data_dir>/<split>/<class>/...`` (or ``<data_dir>/<class>/...``);
    ``few_shot`` keeps that fraction of every class (WeCoLoRA).
  * ``tfds_images``: the TFDS image classification data set ``task`` (e.g. ``cifar100``), with
    the same few-shot rule.
  * ``synthetic``: random ``image_size`` images with the registered task's split size and
    class count (speed measurements without the data; see ``data/synthetic.py``).
  * ``chestxray``: NIH ChestX-ray14 under ``data_dir`` (official layout; splits ``train`` and
    ``test``); ``multilabel_csv``: ``<data_dir>/<split>.csv`` of image path + 0/1 labels. Both
    give packed multi-hot labels (``data/multilabel_csv.py``).
  """
  if backend == "tfds":
    return TfdsTaskSource(task, split, data_dir)
  if backend == "folder":
    if not data_dir:
      raise DataError("the folder backend needs data_dir: the root of <task>/<split>.txt")
    return FolderTaskSource(data_dir, task, split, num_classes=num_classes,
                            train_split=train_split or vtab.DEFAULT_TRAIN_SPLIT)
  if backend == "image_folder":
    if not data_dir:
      raise DataError("the image_folder backend needs data_dir: the root of <class>/<image> "
                      "folders (or of <split>/<class>/<image>)")
    root = image_folder_root(data_dir, split)
    classes = None
    if train_split is not None and train_split != split:
      classes = folder_classes(image_folder_root(data_dir, train_split))
    return ImageFolderSource(root, fraction=few_shot, seed=few_shot_seed, classes=classes)
  if backend == "tfds_images":
    return TfdsImageSource(task, split, data_dir, fraction=few_shot, seed=few_shot_seed)
  if backend == "synthetic":
    return SyntheticTaskSource(task, split, image_size)
  if backend in MULTILABEL_BACKENDS:
    if not data_dir:
      raise DataError(f"the {backend} backend needs data_dir (config.data.root): the data set's "
                      "root directory")
    if few_shot != 1.0:
      raise DataError(f"few-shot subsets are defined per class; the multi-label {backend} "
                      f"backend has none (got fraction {few_shot})")
    if backend == "chestxray":
      from idat_jax.data.chestxray import ChestXray14Source
      return ChestXray14Source(data_dir, split)
    from idat_jax.data.multilabel_csv import MultiLabelCsvSource
    return MultiLabelCsvSource(data_dir, split)
  raise DataError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def load_task_split(task: str, split: str = vtab.DEFAULT_TRAIN_SPLIT, *, backend: str = "folder",
                    data_dir: str | None = None, image_size: int = 224,
                    cache_dir: str | None = None, num_workers: int | None = None,
                    num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Host arrays of a whole split: uint8 (N, S, S, 3) resized directly, int32 labels."""
  source = open_task_split(task, split, backend=backend, data_dir=data_dir,
                           num_classes=num_classes)
  return cache.load_arrays(source, image_size, cache_dir=cache_dir, num_workers=num_workers)
