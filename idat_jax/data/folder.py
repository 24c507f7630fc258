"""Folder backend: the VTAB-1K layout that NOAH writes and SSF/iDAT read.

``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line
``<relative/image/path> <int label>`` with paths relative to ``<root>/<task>``. The iDAT/SSF
protocol trains on ``train800val200`` and evaluates on ``test``. Errors name the list file and
line at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from idat_jax.data import preprocess, vtab
from idat_jax.data.base import (DataError, DataNotPreparedError, ImageLike, Source,
                                 read_text_file, stat_files)

LIST_LINE_FORMAT = "<relative/image/path> <int label>"
TASK_METADATA = "task.json"  # optional, written by digits.py: {"num_classes": ...}


@dataclasses.dataclass(frozen=True)
class ListEntry:
  path: str  # relative to the task dir
  label: int
  line: int  # 1-based line number in the list file


def read_list_file(list_file: str) -> list[ListEntry]:
  """Parses a ``<path> <label>`` list file; blank lines are skipped."""
  if not os.path.isfile(list_file):
    raise DataNotPreparedError(
        f"list file {list_file} does not exist. A VTAB folder task needs "
        f"<root>/<task>/{{{','.join(vtab.SPLITS)}}}.txt with lines '{LIST_LINE_FORMAT}' "
        "(the NOAH/SSF layout); export one from TFDS with "
        "python scripts/prepare_vtab.py --tasks <task> --export_folder <root>")
  entries = []
  text = read_text_file(list_file, f"list files hold lines '{LIST_LINE_FORMAT}'")
  for lineno, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if not line:
      continue
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2:
      raise DataError(f"{list_file}:{lineno}: malformed line {line!r}; expected "
                      f"'{LIST_LINE_FORMAT}'")
    path, label = parts
    try:
      label_value = int(label)
    except ValueError:
      raise DataError(f"{list_file}:{lineno}: malformed line {line!r}; label {label!r} is "
                      f"not an integer (expected '{LIST_LINE_FORMAT}')") from None
    entries.append(ListEntry(path=path, label=label_value, line=lineno))
  return entries


def task_dir_name(task: str) -> str:
  """Folder of a task: the registry's folder name for tasks and aliases, else as given."""
  return vtab.canonical_name(task) if vtab.is_registered(task) else task


def folder_num_classes(task_dir: str, task: str, train_split: str | None = None) -> int:
  """Number of classes: ``task.json``, else the registry, else the largest label of
  ``train_split`` + 1 (without it, or without its list file: of every list file)."""
  meta = os.path.join(task_dir, TASK_METADATA)
  if os.path.isfile(meta):
    try:
      with open(meta, encoding="utf-8") as f:
        value = json.load(f)["num_classes"]
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"num_classes {value!r} is not a positive integer")
      return int(value)
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError too
      raise DataError(f"{meta}: invalid task metadata ({type(e).__name__}: {e}); expected "
                      '{"num_classes": <positive int>} in UTF-8 JSON, or delete the file to '
                      "count the classes from the list files") from None
  if vtab.is_registered(task):
    return vtab.get_task(task).num_classes
  labels = []
  train_file = os.path.join(task_dir, f"{train_split}.txt") if train_split else None
  splits = [train_split] if train_file and os.path.isfile(train_file) else vtab.SPLITS
  for split in splits:
    list_file = os.path.join(task_dir, f"{split}.txt")
    if os.path.isfile(list_file):
      labels.extend(e.label for e in read_list_file(list_file))
  if not labels:
    raise DataNotPreparedError(f"no list files ({', '.join(vtab.SPLITS)}.txt) in {task_dir}")
  return max(labels) + 1


class FolderTaskSource(Source):
  """One split of a VTAB-style folder task."""

  def __init__(self, root: str, task: str, split: str = vtab.DEFAULT_TRAIN_SPLIT,
               num_classes: int | None = None, train_split: str = vtab.DEFAULT_TRAIN_SPLIT):
    self.task = task_dir_name(task)
    self.split = split
    self.task_dir = os.path.join(os.fspath(root), self.task)
    if not os.path.isdir(self.task_dir):
      raise DataNotPreparedError(
          f"folder task directory {self.task_dir} does not exist (root {root}, task {task!r}). "
          "Export VTAB tasks from TFDS with python scripts/prepare_vtab.py --tasks <task> "
          "--export_folder <root>, or write the embedded digits task with "
          "idat_jax.data.write_digits_task(<root>)")
    self.list_file = os.path.join(self.task_dir, f"{split}.txt")
    self.entries = read_list_file(self.list_file)
    if not self.entries:
      raise DataError(f"{self.list_file}: no examples listed")
    self.num_classes = int(num_classes or folder_num_classes(self.task_dir, self.task,
                                                             train_split))
    train_labels = None
    if not (num_classes or vtab.is_registered(self.task) or split == train_split
            or os.path.isfile(os.path.join(self.task_dir, TASK_METADATA))):
      # The classes come from the training split alone: an evaluation class it lacks would
      # be scored by a head never trained on it.
      train_file = os.path.join(self.task_dir, f"{train_split}.txt")
      if os.path.isfile(train_file):
        train_labels = {e.label for e in read_list_file(train_file)}
    for e in self.entries:
      if train_labels is not None and e.label not in train_labels:
        raise DataError(
            f"{self.list_file}:{e.line}: class {e.label} does not occur in the training split "
            f"{train_split}.txt of {self.task_dir} ({len(train_labels)} classes, labels "
            f"{min(train_labels)}..{max(train_labels)}); "
            f"add training examples of it, or declare every class in {TASK_METADATA} "
            '({"num_classes": N})')
      self.check_label(e.label, f"{self.list_file}:{e.line}")
    self.name = f"folder:{self.task}/{split}"

  def __len__(self) -> int:
    return len(self.entries)

  def image_path(self, index: int) -> str:
    return os.path.join(self.task_dir, self.entries[index].path)

  def get(self, index: int) -> tuple[ImageLike, int]:
    entry = self.entries[index]
    path = os.path.join(self.task_dir, entry.path)
    return preprocess.read_image(path, f"{self.list_file}:{entry.line}"), entry.label

  def labels(self) -> np.ndarray:
    return np.asarray([e.label for e in self.entries], np.int32)

  def cache_parts(self) -> tuple[str, ...]:
    return ("folder", self.task, self.split)

  def fingerprint(self) -> str:
    # The list's content, not its mtime: a touched list keeps its cache; changed images are
    # caught per entry by file_stamps.
    digest = hashlib.sha1("\n".join(f"{e.path} {e.label}" for e in self.entries)
                          .encode()).hexdigest()
    return f"folder:{os.path.abspath(self.list_file)}:{digest}:{self.num_classes}"

  def file_stamps(self) -> np.ndarray:
    return stat_files([os.path.join(self.task_dir, e.path) for e in self.entries])
