"""Multi-label image sets: packed multi-hot labels and a generic "CSV of path + labels" reader.

The project's data path (decode cache, device-resident sets, padded evaluation, feature
caching) carries one int32 label per example. A multi-hot vector of up to 31 labels is packed
into that int32 as a bit mask (bit j = label j), so every backend and cache works unchanged;
the probe unpacks it inside jit (:func:`unpack_labels`) for its BCE loss and the AUROC.

CSV format (``<root>/<split>.csv``, e.g. for RSNA or any medical set)::

    path,Atelectasis,Effusion,...
    images/0001.png,1,0,...

The first column is the image path (relative to the CSV's directory, or absolute); every
other column is one label with 0 or 1. Rows are kept in file order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from idat_jax.data import preprocess
from idat_jax.data.base import (DataError, DataNotPreparedError, ImageLike, Source,
                                 read_text_file, stat_files)

MAX_LABELS = 31  # bits of a non-negative int32


def pack_labels(multi_hot: np.ndarray) -> np.ndarray:
  """(N, L) 0/1 -> (N,) int32 bit masks (bit j set when label j is present)."""
  multi_hot = np.asarray(multi_hot)
  if multi_hot.ndim != 2:
    raise ValueError(f"multi-hot labels must be (N, L), got shape {multi_hot.shape}")
  if multi_hot.shape[1] > MAX_LABELS:
    raise DataError(f"{multi_hot.shape[1]} labels do not fit the packed int32 label "
                    f"(at most {MAX_LABELS}); split the label set")
  if not np.all((multi_hot == 0) | (multi_hot == 1)):
    raise DataError("multi-hot labels must be 0 or 1")
  weights = (1 << np.arange(multi_hot.shape[1], dtype=np.int64))
  return (multi_hot.astype(np.int64) @ weights).astype(np.int32)


def unpack_labels(packed, num_labels: int):
  """(N,) int32 bit masks -> (N, L) float32 multi-hot; NumPy or JAX arrays (jittable)."""
  if isinstance(packed, np.ndarray):
    return ((packed[:, None] >> np.arange(num_labels)) & 1).astype(np.float32)
  return ((packed[:, None] >> jnp.arange(num_labels, dtype=packed.dtype)) & 1
          ).astype(jnp.float32)


class MultiLabelSource(Source):
  """Image files with multi-hot labels. ``num_classes`` is the number of labels; ``get``
  returns the packed label (see the module docstring)."""

  multilabel = True

  def __init__(self, paths: Sequence[str], multi_hot: np.ndarray, label_names: Sequence[str],
               name: str, cache_key: tuple[str, ...]):
    self.paths = list(paths)
    self.label_names = list(label_names)
    self.multi_hot = np.asarray(multi_hot, np.float32)
    if self.multi_hot.shape != (len(self.paths), len(self.label_names)):
      raise ValueError(f"{name}: labels of shape {self.multi_hot.shape} for "
                       f"{len(self.paths)} images and {len(self.label_names)} label names")
    self._packed = (pack_labels(self.multi_hot) if len(self.paths)
                    else np.zeros((0,), np.int32))
    self.num_classes = len(self.label_names)
    self.name = name
    self._cache_key = cache_key

  def __len__(self) -> int:
    return len(self.paths)

  def get(self, index: int) -> tuple[ImageLike, int]:
    path = self.paths[index]
    return preprocess.read_image(path), int(self._packed[index])

  def labels(self) -> np.ndarray:
    return self._packed.copy()

  def cache_parts(self) -> tuple[str, ...]:
    return self._cache_key

  def fingerprint(self) -> str:
    digest = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()
    labels = hashlib.sha1(self._packed.tobytes()).hexdigest()
    return f"{type(self).__name__}:{len(self.paths)}:{digest}:{labels}"

  def file_stamps(self) -> np.ndarray:
    return stat_files(self.paths)


class MultiLabelCsvSource(MultiLabelSource):
  """``<root>/<split>.csv``: image path + one 0/1 column per label (module docstring).

  A row whose image file does not exist is skipped and counted (``skipped``; the caller
  logs it), a malformed row is an error naming the file and line.
  """

  def __init__(self, root: str, split: str):
    csv_path = os.path.join(root, f"{split}.csv")
    if not os.path.isfile(csv_path):
      raise DataNotPreparedError(
          f"multi-label CSV {csv_path} not found: expected <root>/<split>.csv with a header "
          "'path,<label 1>,<label 2>,...' and 0/1 label columns")
    text = read_text_file(csv_path, "a multi-label CSV holds 'path,<label 1>,...' rows")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, row_lines = [], []
    for row in reader:
      rows.append(row)
      row_lines.append(reader.line_num)  # the row's last line (a quoted field may span lines)
    if not rows or len(rows[0]) < 2:
      raise DataError(f"{csv_path}: the header must be 'path,<label 1>,...' (at least one label)")
    names = [n.strip() for n in rows[0][1:]]
    if len(set(names)) != len(names) or not all(names):
      raise DataError(f"{csv_path}: label names in the header must be unique and non-empty")
    if len(names) > MAX_LABELS:
      raise DataError(f"{csv_path}: {len(names)} label columns; at most {MAX_LABELS} fit the "
                      "packed int32 label: split the label set over several tasks")
    base = os.path.dirname(os.path.abspath(csv_path))
    paths, hots, missing = [], [], []
    seen: dict[str, tuple[int, list[int]]] = {}  # image -> (first line, its labels)
    duplicates = 0
    for line, row in zip(row_lines[1:], rows[1:]):
      if not row or all(not cell.strip() for cell in row):
        continue
      if len(row) != len(names) + 1:
        raise DataError(f"{csv_path}:{line}: {len(row)} columns, the header has "
                        f"{len(names) + 1}")
      try:
        hot = [int(cell) for cell in row[1:]]
      except ValueError:
        raise DataError(f"{csv_path}:{line}: label values must be 0 or 1, got {row[1:]}") from None
      if any(v not in (0, 1) for v in hot):
        raise DataError(f"{csv_path}:{line}: label values must be 0 or 1, got {row[1:]}")
      path = row[0].strip()
      path = os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))
      if path in seen:
        first, first_hot = seen[path]
        if first_hot != hot:
          raise DataError(f"{csv_path}: image {row[0].strip()} has conflicting labels on lines "
                          f"{first} and {line}; keep one row per image")
        duplicates += 1  # the same row again: counted and skipped
        continue
      seen[path] = (line, hot)
      if not os.path.isfile(path):
        missing.append(path)
        continue
      paths.append(path)
      hots.append(hot)
    if not paths:
      raise DataError(f"{csv_path}: no row names an existing image "
                      f"({len(missing)} missing, e.g. {missing[:1]})")
    self.skipped = {"missing_image": len(missing)}
    if duplicates:
      self.skipped["duplicate_row"] = duplicates
    self.missing_examples = missing[:5]
    if duplicates:
      logging.warning("%s: %d row(s) repeat an earlier row of the same image with the same "
                      "labels; they are skipped", csv_path, duplicates)
    if missing:
      logging.warning("%s: %d row(s) name a missing image (e.g. %s); they are left out",
                      csv_path, len(missing), missing[:3])
    super().__init__(paths, np.asarray(hots, np.float32).reshape(len(paths), len(names)), names,
                     name=f"multilabel_csv:{csv_path}",
                     cache_key=("multilabel_csv", os.path.basename(os.path.normpath(root)),
                                split))
