"""Common pieces of the data backends: errors, the example-source interface, host shares."""

from __future__ import annotations

import abc
import hashlib
import os
from typing import Callable, Sequence, Union

import numpy as np
from absl import logging
from PIL import Image

from idat_jax.errors import IdatError

# A decoded image: an RGB PIL image or an (H, W, 3) uint8 array, at its native size.
ImageLike = Union[Image.Image, np.ndarray]


class DataError(IdatError, ValueError):
  """Bad or missing input data. Messages name the file, line, directory or task at fault."""


class DataNotPreparedError(DataError):
  """A TFDS data set (or folder task) is not on disk; the message says how to prepare it."""


class UnknownTaskError(DataError, KeyError):
  """A task name that is neither a registered task nor an alias."""

  def __str__(self) -> str:  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


class Source(abc.ABC):
  """Random access to decoded examples (native-size RGB image, int label).

  Backends implement this; caching, device-resident sets, evaluation and streaming all work
  on any source, reading only the indices the current process needs.
  """

  name: str = "source"
  num_classes: int = 0

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def get(self, index: int) -> tuple[ImageLike, int]:
    """Example ``index``: RGB image (PIL or uint8 array) and label in [0, num_classes)."""

  def labels(self) -> np.ndarray:
    """All labels as int32 (backends override this when labels are cheaper than images)."""
    return np.asarray([self.get(i)[1] for i in range(len(self))], np.int32)

  def cache_parts(self) -> tuple[str, ...] | None:
    """Path parts of the disk-cache key (backend, task, split), or None to never cache."""
    return None

  def fingerprint(self) -> str:
    """A string that changes when the underlying data changes (part of the cache key)."""
    return f"{type(self).__name__}:{self.name}:{len(self)}"

  def file_stamps(self) -> np.ndarray | None:
    """(N, 2) int64 (size, mtime_ns) of each example's image file, or None (no files).

    The decode cache compares them on every load, so an image replaced in place is decoded
    again (only that entry) although the list of examples did not change.
    """
    return None

  def check_label(self, label: int, where: str) -> int:
    if not 0 <= label < self.num_classes:
      raise DataError(f"{where}: label {label} is outside [0, {self.num_classes}) "
                      f"({self.name} has {self.num_classes} classes)")
    return int(label)


class ArraySource(Source):
  """In-memory examples, e.g. for tests or data already decoded by other code."""

  def __init__(self, images: np.ndarray, labels: Sequence[int], num_classes: int | None = None,
               name: str = "arrays"):
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise DataError(f"{name}: images must be uint8 (N, H, W, 3), got {images.dtype} "
                      f"{images.shape}")
    if labels.shape != (images.shape[0],):
      raise DataError(f"{name}: {labels.shape[0]} labels for {images.shape[0]} images")
    self.images, self._labels, self.name = images, labels, name
    self.num_classes = int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)
    for i, label in enumerate(labels):
      self.check_label(int(label), f"{name} example {i}")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def get(self, index: int) -> tuple[ImageLike, int]:
    return self.images[index], int(self._labels[index])

  def labels(self) -> np.ndarray:
    return self._labels.copy()


class SubsetSource(Source):
  """The examples ``indices`` of another source (e.g. one side of a stratified split)."""

  def __init__(self, source: Source, indices: Sequence[int], name: str):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.num_classes = source.num_classes
    self.name = name
    self._labels = source.labels()[self.indices]

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  def get(self, index: int) -> tuple[ImageLike, int]:
    return self.source.get(int(self.indices[index]))

  def labels(self) -> np.ndarray:
    return self._labels.copy()

  def cache_parts(self) -> tuple[str, ...] | None:
    parts = self.source.cache_parts()
    return None if parts is None else parts[:-1] + (self.name.replace("/", "_"),)

  def fingerprint(self) -> str:
    # hashlib, not hash(): bytes hashes are salted per process, which made every run miss
    # the cache of a stratified split.
    digest = hashlib.sha1(self.indices.tobytes()).hexdigest()[:16]
    return f"{self.source.fingerprint()}|{self.name}|{digest}"

  def file_stamps(self) -> np.ndarray | None:
    stamps = self.source.file_stamps()
    return None if stamps is None else stamps[self.indices]


def walk_files(top: str, keep: Callable[[str], bool]) -> list[str]:
  """Files under ``top`` whose name ``keep`` accepts, as sorted paths relative to ``top``.

  Directory links are followed, but a link back into its own ancestry (a loop) or one that
  does not resolve (ELOOP) is skipped: the walk always ends, and the skipped links are counted
  in one warning naming the first, so an image set is never silently cut short.
  """
  found, loops = [], []
  root_stat = os.stat(top)
  pending = [("", frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
  while pending:
    rel, ancestors = pending.pop()
    with os.scandir(os.path.join(top, rel)) as it:
      for entry in it:
        child = os.path.join(rel, entry.name) if rel else entry.name
        try:
          is_dir = entry.is_dir(follow_symlinks=True)
          st = os.stat(entry.path) if is_dir else None
        except OSError:  # a link to itself, or a cycle of links
          loops.append(os.path.join(top, child))
          continue
        if is_dir:
          key = (st.st_dev, st.st_ino)
          if key in ancestors:
            loops.append(os.path.join(top, child))
            continue
          pending.append((child, ancestors | {key}))
        elif keep(entry.name):
          found.append(child)
  if loops:
    logging.warning("%s: skipped %d symbolic link(s) that loop back into their own folder "
                    "tree (e.g. %s -> %s)", top, len(loops), loops[0],
                    os.readlink(loops[0]) if os.path.islink(loops[0]) else "?")
  return sorted(found)


def read_text_file(path: str, expected: str) -> str:
  """A list or CSV file as text: UTF-8, with or without the byte-order mark Excel writes.

  Bytes that are not UTF-8 are a DataError naming the file and line (``expected``: what the
  file should hold, for the message).
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}: not UTF-8 text (byte {e.start}, line {line}: {e.reason}); "
                    f"{expected}, saved as UTF-8") from None


def stat_files(paths: Sequence[str]) -> np.ndarray:
  """(N, 2) int64 (size, mtime_ns) of files; a missing file gets (-1, -1) (decoding then
  names it)."""
  out = np.full((len(paths), 2), -1, np.int64)
  for i, path in enumerate(paths):
    try:
      st = os.stat(path)
    except OSError:
      continue
    out[i] = (st.st_size, st.st_mtime_ns)
  return out


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous share ``[start, stop)`` of one process (``tfds.even_splits`` semantics).

  The first ``num_examples % process_count`` processes get one extra example.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)
