"""Decode-and-resize once: uint8 arrays from a source, with an optional ``.npy`` disk cache.

The cache lives at ``<cache_dir>/<backend>/<task>/<split>_<size>px_<fingerprint>[_rows<a>-<b>]/``
with ``images.npy`` (uint8 N x S x S x 3), ``labels.npy`` (int32), ``stamps.npy`` (each image
file's size and mtime, for sources backed by files) and ``meta.json``. A second run on the same
task memory-maps the arrays instead of decoding images again; images whose file changed since
are decoded again one by one. Entries are
written to a temporary directory and renamed, so a crash or a concurrent writer never leaves a
half-written entry behind.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
from typing import Callable, Sequence

import numpy as np
from absl import logging

from idat_jax.data import preprocess
from idat_jax.fileio import atomic_write
from idat_jax.data.base import ImageLike, Source

_CHUNK = 256  # images in flight per decode chunk (bounds host memory)
_STAMPS = "stamps.npy"  # (N, 2) int64 (size, mtime_ns) of each cached image file


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
                    rows: tuple[int, int] | None = None, transform_key: str = "") -> str | None:
  """Cache directory of (source, size, rows, transform), or None when not cacheable."""
  parts = source.cache_parts()
  if not parts:
    return None
  digest = hashlib.sha1((source.fingerprint() + "|" + transform_key).encode()).hexdigest()[:10]
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


def _save_stamps(entry: str, stamps: np.ndarray) -> None:
  """Written last and renamed into place: stamps only ever describe pixels already on disk."""
  with atomic_write(os.path.join(entry, _STAMPS)) as tmp:
    np.save(tmp, stamps)


def _refresh_changed(entry: str, source: Source, start: int, stamps: np.ndarray,
                     image_size: int, num_workers: int | None,
                     transform: Callable[[ImageLike, int], np.ndarray] | None) -> None:
  """Decodes again the entries whose image file changed (size or mtime) since caching."""
  try:
    old = np.load(os.path.join(entry, _STAMPS))
  except (OSError, ValueError):
    old = None
  if old is not None and old.shape == stamps.shape:
    changed = np.flatnonzero(np.any(old != stamps, axis=1))
  else:
    changed = np.arange(stamps.shape[0])
  if not changed.size:
    return
  images = np.load(os.path.join(entry, "images.npy"), mmap_mode="r+")
  labels = np.load(os.path.join(entry, "labels.npy"))
  new_images = np.zeros((changed.size,) + images.shape[1:], np.uint8)
  new_labels = np.zeros((changed.size,), np.int32)
  decode_into(source, (start + changed).tolist(), image_size, new_images, new_labels,
              num_workers, transform=transform)
  images[changed] = new_images
  images.flush()
  del images
  if np.any(labels[changed] != new_labels):
    labels[changed] = new_labels
    np.save(os.path.join(entry, "labels.npy"), labels)
  _save_stamps(entry, stamps)
  logging.info("%d of %d cached images of %s changed on disk (size or mtime): decoded them "
               "again in %s", changed.size, stamps.shape[0], source.name, entry)


def load_arrays(source: Source, image_size: int, *, rows: tuple[int, int] | None = None,
                cache_dir: str | None = None, num_workers: int | None = None,
                mmap: bool = True,
                transform: Callable[[ImageLike, int], np.ndarray] | None = None,
                transform_key: str = "") -> tuple[np.ndarray, np.ndarray]:
  """uint8 (N, S, S, 3) images of ``source`` and int32 labels.

  Images are resized straight to S x S, or made by ``transform(image, index)``, which must
  be deterministic and named by ``transform_key`` to be cached (an unnamed transform is
  never cached). ``rows=(start, stop)`` reads only that contiguous range (one process's
  share). With a ``cache_dir`` the result is stored as ``.npy`` and memory-mapped on later
  calls; the key is the list of examples, and each image file's size and mtime are compared
  on every load, so a file replaced in place is decoded again (that entry only).
  """
  start, stop = rows if rows is not None else (0, len(source))
  if not 0 <= start <= stop <= len(source):
    raise ValueError(f"rows {rows} outside [0, {len(source)}] of {source.name}")
  full = (start, stop) == (0, len(source))
  count = stop - start
  cacheable = cache_dir and (transform is None or transform_key)
  entry = cache_entry_dir(cache_dir, source, image_size, None if full else (start, stop),
                          transform_key) if cacheable else None
  stamps = source.file_stamps() if entry is not None else None
  if stamps is not None:
    stamps = np.asarray(stamps, np.int64)[start:stop]
  if entry is not None and os.path.isdir(entry):
    cached = _read_entry(entry, count, image_size, mmap)
    if cached is not None:
      if stamps is not None:
        _refresh_changed(entry, source, start, stamps, image_size, num_workers, transform)
        cached = _read_entry(entry, count, image_size, mmap)
      if cached is not None:
        logging.info("loaded %d cached images of %s from %s", count, source.name, entry)
        return cached
  shape = (count, image_size, image_size, 3)
  labels = np.zeros((count,), np.int32)
  if entry is None:
    images = np.zeros(shape, np.uint8)
    decode_into(source, range(start, stop), image_size, images, labels, num_workers,
                transform=transform)
    return images, labels
  # A concurrent writer that wins the rename made an equivalent entry: keep theirs.
  with atomic_write(entry, directory=True, accept_existing=lambda _: True) as tmp:
    images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+",
                                       dtype=np.uint8, shape=shape)
    decode_into(source, range(start, stop), image_size, images, labels, num_workers,
                transform=transform)
    images.flush()
    del images
    np.save(os.path.join(tmp, "labels.npy"), labels)
    if stamps is not None:
      np.save(os.path.join(tmp, _STAMPS), stamps)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump({"source": source.name, "fingerprint": source.fingerprint(), "count": count,
                 "image_size": image_size, "rows": [start, stop],
                 "transform": transform_key}, f, indent=1)
  logging.info("decoded %d images of %s into cache %s", count, source.name, entry)
  cached = _read_entry(entry, count, image_size, mmap)
  if cached is None:
    raise OSError(f"cache entry {entry} could not be read back")
  return cached
