"""Decode-and-resize once: uint8 arrays from a source, with an optional ``.npy`` disk cache.

The cache lives at ``<cache_dir>/<backend>/<task>/<split>_<size>px_<fingerprint>[_rows<a>-<b>]/``
with ``images.npy`` (uint8 N x S x S x 3), ``labels.npy`` (int32) and ``meta.json``. A second
run on the same task memory-maps the arrays instead of decoding images again. Entries are
written to a temporary directory and renamed, so a crash or a concurrent writer never leaves a
half-written entry behind.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Sequence

import numpy as np
from absl import logging

from idat_jax.data import preprocess
from idat_jax.data.base import ImageLike, Source

_CHUNK = 256  # images in flight per decode chunk (bounds host memory)


def default_num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def decode_into(source: Source, indices: Sequence[int], image_size: int, images: np.ndarray,
                labels: np.ndarray, num_workers: int | None = None,
                transform: Callable[[ImageLike, int], np.ndarray] | None = None,
                pool: concurrent.futures.Executor | None = None) -> None:
  """Decodes ``source[indices]`` into ``images``/``labels`` (threads: PIL releases the GIL).

  ``transform(image, index)`` replaces the default direct bicubic resize when given; ``pool``
  reuses an existing thread pool instead of starting one.
  """

  def work(index: int) -> tuple[np.ndarray, int]:
    image, label = source.get(int(index))
    out = transform(image, int(index)) if transform else preprocess.resize(image, image_size)
    return out, label

  indices = list(indices)
  if pool is None:
    num_workers = num_workers or default_num_workers()
    if num_workers <= 1 or len(indices) <= 1:
      for j, index in enumerate(indices):
        images[j], labels[j] = work(index)
      return
    with concurrent.futures.ThreadPoolExecutor(num_workers) as own_pool:
      decode_into(source, indices, image_size, images, labels, transform=transform,
                  pool=own_pool)
    return
  for start in range(0, len(indices), _CHUNK):
    chunk = indices[start:start + _CHUNK]
    for j, (image, label) in enumerate(pool.map(work, chunk), start=start):
      images[j], labels[j] = image, label


def _safe(part: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", part) or "_"


def cache_entry_dir(cache_dir: str, source: Source, image_size: int,
                    rows: tuple[int, int] | None = None) -> str | None:
  """Cache directory of (source, size, rows), or None when the source is not cacheable."""
  parts = source.cache_parts()
  if not parts:
    return None
  digest = hashlib.sha1(source.fingerprint().encode()).hexdigest()[:10]
  leaf = f"{_safe(parts[-1])}_{image_size}px_{digest}"
  if rows is not None:
    leaf += f"_rows{rows[0]}-{rows[1]}"
  return os.path.join(os.fspath(cache_dir), *[_safe(p) for p in parts[:-1]], leaf)


def _read_entry(path: str, count: int, image_size: int, mmap: bool):
  try:
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
      meta = json.load(f)
    images = np.load(os.path.join(path, "images.npy"), mmap_mode="r" if mmap else None)
    labels = np.load(os.path.join(path, "labels.npy"))
  except (OSError, ValueError) as e:
    logging.warning("ignoring unreadable cache entry %s: %s", path, e)
    return None
  if (meta.get("count") != count or images.shape != (count, image_size, image_size, 3)
      or labels.shape != (count,)):
    logging.warning("ignoring inconsistent cache entry %s", path)
    return None
  return images, labels.astype(np.int32)


def load_arrays(source: Source, image_size: int, *, rows: tuple[int, int] | None = None,
                cache_dir: str | None = None, num_workers: int | None = None,
                mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (N, S, S, 3) images resized straight to S x S and int32 labels of ``source``.

  ``rows=(start, stop)`` reads only that contiguous range (one process's share). With a
  ``cache_dir`` the result is stored as ``.npy`` and memory-mapped on later calls.
  """
  start, stop = rows if rows is not None else (0, len(source))
  if not 0 <= start <= stop <= len(source):
    raise ValueError(f"rows {rows} outside [0, {len(source)}] of {source.name}")
  full = (start, stop) == (0, len(source))
  count = stop - start
  entry = cache_entry_dir(cache_dir, source, image_size, None if full else (start, stop)) \
      if cache_dir else None
  if entry is not None and os.path.isdir(entry):
    cached = _read_entry(entry, count, image_size, mmap)
    if cached is not None:
      logging.info("loaded %d cached images of %s from %s", count, source.name, entry)
      return cached
  shape = (count, image_size, image_size, 3)
  labels = np.zeros((count,), np.int32)
  if entry is None:
    images = np.zeros(shape, np.uint8)
    decode_into(source, range(start, stop), image_size, images, labels, num_workers)
    return images, labels
  parent = os.path.dirname(entry)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(entry) + ".tmp-", dir=parent)
  try:
    images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+",
                                       dtype=np.uint8, shape=shape)
    decode_into(source, range(start, stop), image_size, images, labels, num_workers)
    images.flush()
    del images
    np.save(os.path.join(tmp, "labels.npy"), labels)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump({"source": source.name, "fingerprint": source.fingerprint(), "count": count,
                 "image_size": image_size, "rows": [start, stop]}, f, indent=1)
    if os.path.isdir(entry):  # an inconsistent entry: replace it
      shutil.rmtree(entry, ignore_errors=True)
    try:
      os.rename(tmp, entry)
    except OSError:  # another process won the race; its entry is equivalent
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("decoded %d images of %s into cache %s", count, source.name, entry)
  cached = _read_entry(entry, count, image_size, mmap)
  if cached is None:
    raise OSError(f"cache entry {entry} could not be read back")
  return cached
