"""Host-side batch iterators: padded/masked evaluation and the streamed, augmented train set.

* Evaluation pads to full global batches with a boolean ``mask``; every process runs the same
  number of batches (that of the largest share), so each example counts exactly once on any
  number of devices or hosts. Sets that fit ``resident_budget_bytes`` stay on the devices.
* The image-folder (WeCoLoRA) pipeline streams augmented batches decoded by a thread pool and
  prefetched in the background, deterministic from (seed, epoch).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idat_jax import sharding as shd
from idat_jax.data import cache, preprocess
from idat_jax.data.base import ImageLike, Source, process_range
from idat_jax.data.resident import steps_per_epoch

DEFAULT_RESIDENT_BUDGET_BYTES = 2 << 30  # eval sets up to 2 GiB (uint8, all devices) stay resident


# Host-side helpers shared by evaluation and streaming.

_END = object()


class _Failure:

  def __init__(self, exc: BaseException):
    self.exc = exc


def _background(make_items: Callable[[], Iterator[Any]], size: int) -> Iterator[Any]:
  """Runs ``make_items()`` in a thread, ``size`` items ahead; stops when the consumer does."""
  q: queue.Queue = queue.Queue(maxsize=max(1, size))
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def run():
    items = make_items()
    try:
      for item in items:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # handed to the consumer
      put(_Failure(e))
    finally:
      close = getattr(items, "close", None)
      if close is not None:
        close()

  thread = threading.Thread(target=run, daemon=True, name="idat-data-prefetch")
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.exc
      yield item
  finally:
    stop.set()


def _local_batch(global_batch: int, mesh: Mesh, process_count: int, what: str) -> int:
  """Each process's share of a global batch, which must split over devices and processes."""
  shd.check_batch_size(global_batch, mesh, f"{what} batch size")
  if global_batch % process_count:
    raise ValueError(f"{what} batch {global_batch} does not split over {process_count} processes")
  return global_batch // process_count


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


# ---------------------------------------------------------------------------------------------
# Evaluation.


class EvalIterator:
  """Re-iterable padded evaluation batches ``{'image': uint8, 'label': int32, 'mask': bool}``.

  Each process reads its contiguous share of the set (``tfds.even_splits`` semantics) and all
  processes yield ``num_batches`` global batches sharded on ``data``; padding rows have
  ``mask == False``. Sum a metric over ``mask`` and divide by :attr:`num_examples`.
  The set stays on the devices when its padded byte size is at most
  ``resident_budget_bytes``; otherwise batches are streamed from the host (from the disk
  cache when ``cache_dir`` is given, else decoded each pass).
  """

  def __init__(self, source: Source, image_size: int, global_batch: int, mesh: Mesh, *,
               resident_budget_bytes: int = DEFAULT_RESIDENT_BUDGET_BYTES,
               cache_dir: str | None = None, num_workers: int | None = None,
               prefetch: int = 2, process_index: int | None = None,
               process_count: int | None = None):
    self.source, self.image_size, self.mesh = source, image_size, mesh
    self.global_batch = global_batch
    self.cache_dir, self.num_workers, self.prefetch = cache_dir, num_workers, prefetch
    self.process_index, self.process_count = _process(process_index, process_count)
    self.local_batch = _local_batch(global_batch, mesh, self.process_count, "eval")
    self.num_examples = len(source)
    self.rows = process_range(self.num_examples, self.process_index, self.process_count)
    largest_share = -(-self.num_examples // self.process_count)
    self.num_batches = max(1, -(-largest_share // self.local_batch))
    padded_bytes = self.num_batches * global_batch * image_size * image_size * 3
    self.resident = padded_bytes <= resident_budget_bytes
    self._arrays = None  # host arrays of this process's share (cache or resident mode)
    self._device = None  # resident: {'image': [K, B, S, S, 3], ...} sharded on axis 1
    self._take = None

  def __len__(self) -> int:
    return self.num_batches

  def _local_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    if self._arrays is None:
      self._arrays = cache.load_arrays(self.source, self.image_size, rows=self.rows,
                                       cache_dir=self.cache_dir, num_workers=self.num_workers)
    return self._arrays

  def _local_padded(self) -> dict[str, np.ndarray]:
    """This process's share padded to ``num_batches * local_batch`` rows, with the mask."""
    images, labels = self._local_arrays()
    total = self.num_batches * self.local_batch
    count = images.shape[0]
    out_images = np.zeros((total,) + images.shape[1:], np.uint8)
    out_images[:count] = images
    out_labels = np.zeros((total,), np.int32)
    out_labels[:count] = labels
    mask = np.arange(total) < count
    return {"image": out_images, "label": out_labels, "mask": mask}

  def _resident_arrays(self) -> dict[str, jax.Array]:
    if self._device is None:
      local = self._local_padded()
      k, bl, gb = self.num_batches, self.local_batch, self.global_batch
      sharding = NamedSharding(self.mesh, P(None, shd.DATA_AXIS))
      self._device = {
          key: jax.make_array_from_process_local_data(
              sharding, value.reshape((k, bl) + value.shape[1:]), (k, gb) + value.shape[1:])
          for key, value in local.items()}
      self._arrays = None  # the host copy is no longer needed
      self._take = jax.jit(lambda arrays, i: jax.tree.map(lambda a: a[i], arrays),
                           out_shardings=shd.batch_sharded(self.mesh))
    return self._device

  @property
  def resident_arrays(self) -> dict[str, jax.Array] | None:
    """Resident mode: ``[num_batches, global_batch, ...]`` arrays (for a scan in one jit)."""
    return self._resident_arrays() if self.resident else None

  def _local_batches(self) -> Iterator[dict[str, np.ndarray]]:
    start, stop = self.rows
    count = stop - start
    bl = self.local_batch
    pool = None
    if self.cache_dir is None:
      pool = concurrent.futures.ThreadPoolExecutor(
          self.num_workers or cache.default_num_workers())
    try:
      for b in range(self.num_batches):
        lo, hi = min(b * bl, count), min((b + 1) * bl, count)
        images = np.zeros((bl, self.image_size, self.image_size, 3), np.uint8)
        labels = np.zeros((bl,), np.int32)
        if hi > lo:
          if pool is None:
            cached_images, cached_labels = self._local_arrays()
            images[:hi - lo] = cached_images[lo:hi]
            labels[:hi - lo] = cached_labels[lo:hi]
          else:
            cache.decode_into(self.source, range(start + lo, start + hi), self.image_size,
                              images, labels, pool=pool)
        yield {"image": images, "label": labels, "mask": np.arange(bl) < hi - lo}
    finally:
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    if self.resident:
      arrays = self._resident_arrays()
      for b in range(self.num_batches):
        yield self._take(arrays, b)
      return
    for local in _background(self._local_batches, self.prefetch):
      yield shd.global_batch_from_local(local, self.mesh)


# ---------------------------------------------------------------------------------------------
# Streamed, augmented training batches (image-folder / few-shot TFDS sources).


class StreamingTrainIterator:
  """Global training batches ``{'image': uint8, 'label': int32}`` decoded on the host.

  Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(n)`` in global batches
  (drop-last); each process decodes its slice of every global batch. With ``augment`` each
  image gets WeCoLoRA's RandomResizedCrop + flip from (seed, epoch, example index); without,
  the direct resize. Batches are produced by a thread pool, ``prefetch`` ahead.
  """

  def __init__(self, source: Source, image_size: int, global_batch: int, mesh: Mesh, *,
               seed: int = 0, augment: bool = True, scale: tuple[float, float] = (0.2, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
               num_workers: int | None = None, prefetch: int = 2,
               process_index: int | None = None, process_count: int | None = None):
    self.source, self.image_size, self.mesh = source, image_size, mesh
    self.global_batch, self.seed, self.augment = global_batch, int(seed), augment
    self.scale, self.ratio, self.flip_prob = scale, ratio, flip_prob
    self.num_workers = num_workers or cache.default_num_workers()
    self.prefetch = prefetch
    self.process_index, self.process_count = _process(process_index, process_count)
    self.local_batch = _local_batch(global_batch, mesh, self.process_count, "train")
    self.num_examples = len(source)
    self.steps_per_epoch = steps_per_epoch(self.num_examples, global_batch)

  def epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)

  def local_indices(self, epoch: int, step: int) -> np.ndarray:
    """Example indices this process decodes for (epoch, step)."""
    if not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"step {step} outside [0, {self.steps_per_epoch})")
    start = step * self.global_batch + self.process_index * self.local_batch
    return self.epoch_order(epoch)[start:start + self.local_batch]

  def _transform(self, epoch: int) -> Callable[[ImageLike, int], np.ndarray] | None:
    if not self.augment:
      return None

    def fn(image: ImageLike, index: int) -> np.ndarray:
      rng = preprocess.augment_rng(self.seed, epoch, index)
      return preprocess.random_resized_crop_flip(image, self.image_size, rng, self.scale,
                                                 self.ratio, self.flip_prob)

    return fn

  def _decode(self, epoch: int, step: int, pool=None) -> dict[str, np.ndarray]:
    idx = self.local_indices(epoch, step)
    images = np.zeros((len(idx), self.image_size, self.image_size, 3), np.uint8)
    labels = np.zeros((len(idx),), np.int32)
    cache.decode_into(self.source, idx, self.image_size, images, labels,
                      num_workers=self.num_workers, transform=self._transform(epoch), pool=pool)
    return {"image": images, "label": labels}

  def local_batch_arrays(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """This process's host arrays of (epoch, step), without prefetching (for inspection)."""
    return self._decode(epoch, step)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Global sharded batches of one epoch from ``start_step`` (to resume mid-epoch)."""

    def produce():
      with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
        for step in range(start_step, self.steps_per_epoch):
          yield self._decode(epoch, step, pool)

    for local in _background(produce, self.prefetch):
      yield shd.global_batch_from_local(local, self.mesh)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    """All epochs from 0, forever."""
    epoch = 0
    while True:
      yield from self.epoch(epoch)
      epoch += 1
