"""Device-resident training sets: decoded once, sharded over ``data``, batched inside jit.

VTAB-1K train sets hold 1,000 images: they are decoded and resized once, padded to a multiple
of the device count and kept on the devices, sharded over the ``data`` axis. Each step draws
its batch inside jit (:func:`batch_indices` + :func:`gather_batch`), so an epoch costs no host
work. The order is a permutation from (seed, epoch), with drop-last.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idat_jax import sharding as shd
from idat_jax.data import cache
from idat_jax.data.base import Source

# ---------------------------------------------------------------------------------------------
# Shuffled batches of a device-resident training set.


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Drop-last steps per epoch: ``num_examples // global_batch`` (at least one is required)."""
  if global_batch <= 0 or num_examples < global_batch:
    raise ValueError(f"global batch {global_batch} needs at least as many examples; "
                     f"got {num_examples}")
  return num_examples // global_batch


def _as_key(seed_or_key: Any) -> jax.Array:
  if isinstance(seed_or_key, (int, np.integer)):
    return jax.random.PRNGKey(int(seed_or_key))
  arr = seed_or_key
  if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
    return arr
  if arr.shape == (2,) and arr.dtype == jnp.uint32:
    return arr
  if arr.shape == ():
    return jax.random.PRNGKey(arr)
  raise ValueError(f"expected an int seed or a PRNG key, got {arr.dtype} {arr.shape}")


def epoch_permutation(seed_or_key: Any, epoch: Any, num_examples: int) -> jax.Array:
  """The example order of one epoch: a permutation of ``num_examples`` from (seed, epoch)."""
  key = jax.random.fold_in(_as_key(seed_or_key), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def batch_indices(seed_or_key: Any, epoch: Any, step_in_epoch: Any, num_examples: int,
                  global_batch: int) -> jax.Array:
  """int32 [global_batch] example indices of one training step; jittable, deterministic.

  Step ``s`` of epoch ``e`` takes positions ``[s * B, (s + 1) * B)`` of the epoch's
  permutation, so the ``num_examples // B`` steps of an epoch never repeat an example and the
  last ``num_examples % B`` are dropped (a different set each epoch). ``num_examples`` and
  ``global_batch`` must be static; seed/key, epoch and step may be traced.
  """
  steps_per_epoch(num_examples, global_batch)
  perm = epoch_permutation(seed_or_key, epoch, num_examples)
  start = jnp.asarray(step_in_epoch, jnp.int32) * global_batch
  return jax.lax.dynamic_slice_in_dim(perm, start, global_batch)


def gather_batch(images: jax.Array, labels: jax.Array, indices: jax.Array,
                 mesh: Mesh) -> dict[str, jax.Array]:
  """``{'image', 'label'}`` rows ``indices`` of resident arrays, sharded on ``data``.

  Call inside jit. Each device gathers the requested rows it holds, bucketed by the device
  whose slice of the batch they belong to; one all-to-all over ``data`` delivers them, so
  only the batch (not the data set) moves, as plain data (no reduction, any dtype).
  ``indices`` must be < the true example count.
  """
  axis = shd.DATA_AXIS
  n_dev = shd.data_size(mesh)
  batch = indices.shape[0]
  if batch % n_dev:
    raise ValueError(f"batch {batch} is not a multiple of the {n_dev} devices")
  per_dev = batch // n_dev

  def local(img_shard, label_shard, idx):
    rows = img_shard.shape[0]
    pos = idx - jax.lax.axis_index(axis) * rows
    pos = jnp.clip(pos, 0, rows - 1)  # rows held elsewhere are fetched but never selected
    owner = jax.lax.dynamic_slice_in_dim(idx, jax.lax.axis_index(axis) * per_dev, per_dev)
    owner = owner // rows  # device holding each row of this device's slice
    pick = jnp.arange(per_dev)

    def exchange(x):
      x = jnp.take(x, pos, axis=0).reshape((n_dev, per_dev) + x.shape[1:])
      x = jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0)  # [source device, ...]
      return x[owner, pick]

    return exchange(img_shard), exchange(label_shard)

  img, lab = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P()),
                           out_specs=(P(axis), P(axis)))(images, labels, indices)
  return {"image": img, "label": lab}


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _process_rows(global_shape: tuple[int, ...], sharding: NamedSharding) -> tuple[int, int]:
  """[lo, hi) of dim 0 that this process's devices hold."""
  spans = [idx[0].indices(global_shape[0])[:2]
           for idx in sharding.addressable_devices_indices_map(global_shape).values()]
  return min(s for s, _ in spans), max(e for _, e in spans)


def _put_rows(local: np.ndarray, lo: int, global_shape: tuple[int, ...],
              sharding: NamedSharding) -> jax.Array:
  """A global array from this process's rows ``[lo, lo + len(local))`` of dim 0."""

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    start, stop, _ = index[0].indices(global_shape[0])
    return local[(slice(start - lo, stop - lo),) + tuple(index[1:])]

  return jax.make_array_from_callback(global_shape, sharding, shard)


@struct.dataclass
class ResidentTrainSet:
  """A training set on the devices: uint8 images and int32 labels sharded on ``data``.

  A pytree (arrays are leaves, the count and mesh are static), so pass it to the jitted train
  step as an argument and call :meth:`batch` inside: nothing is copied from the host per step.
  Rows ``>= num_examples`` are padding and are never drawn.
  """
  images: jax.Array
  labels: jax.Array
  num_examples: int = struct.field(pytree_node=False)
  mesh: Mesh = struct.field(pytree_node=False)

  def steps_per_epoch(self, global_batch: int) -> int:
    return steps_per_epoch(self.num_examples, global_batch)

  def indices(self, seed_or_key: Any, epoch: Any, step_in_epoch: Any,
              global_batch: int) -> jax.Array:
    return batch_indices(seed_or_key, epoch, step_in_epoch, self.num_examples, global_batch)

  def batch(self, seed_or_key: Any, epoch: Any, step_in_epoch: Any,
            global_batch: int) -> dict[str, jax.Array]:
    """The uint8 ``image`` / int32 ``label`` batch of (epoch, step), sharded on ``data``."""
    idx = self.indices(seed_or_key, epoch, step_in_epoch, global_batch)
    return gather_batch(self.images, self.labels, idx, self.mesh)


def put_resident_train(images: np.ndarray, labels: np.ndarray, mesh: Mesh,
                       num_examples: int | None = None, row_offset: int = 0) -> ResidentTrainSet:
  """Places host arrays on the devices, padded (zeros) to a multiple of the device count.

  ``images`` is any [N, ...] array (uint8 images, or e.g. cached float features; the dtype is
  kept). ``images``/``labels`` hold rows ``[row_offset, row_offset + len)`` of the set (all
  of it on one host; at least this process's rows on several), ``num_examples`` the total.
  """
  n = int(num_examples if num_examples is not None else images.shape[0])
  padded = _round_up(n, shd.data_size(mesh))
  sharding = shd.batch_sharded(mesh)
  lo, hi = _process_rows((padded,), sharding)
  have_lo, have_hi = row_offset, row_offset + images.shape[0]
  if lo < have_lo or min(hi, n) > have_hi:
    raise ValueError(f"this process needs rows [{lo}, {min(hi, n)}) of the training set, "
                     f"got [{have_lo}, {have_hi})")
  take = slice(lo - row_offset, min(hi, n) - row_offset)
  local_images = np.zeros((hi - lo,) + images.shape[1:], images.dtype)
  local_labels = np.zeros((hi - lo,), np.int32)
  local_images[:min(hi, n) - lo] = images[take]
  local_labels[:min(hi, n) - lo] = labels[take]
  return ResidentTrainSet(
      images=_put_rows(local_images, lo, (padded,) + tuple(images.shape[1:]), sharding),
      labels=_put_rows(local_labels, lo, (padded,), sharding),
      num_examples=n, mesh=mesh)


def resident_train_set(source: Source, image_size: int, mesh: Mesh, *,
                       cache_dir: str | None = None,
                       num_workers: int | None = None) -> ResidentTrainSet:
  """Decodes (or loads from the cache) the rows this process holds and puts them on device."""
  n = len(source)
  padded = _round_up(n, shd.data_size(mesh))
  lo, hi = _process_rows((padded,), shd.batch_sharded(mesh))
  rows = (min(lo, n), min(hi, n))
  images, labels = cache.load_arrays(source, image_size, rows=rows, cache_dir=cache_dir,
                                     num_workers=num_workers)
  logging.info("resident train set %s: %d examples (%d padded) at %dpx on %d devices",
               source.name, n, padded, image_size, shd.data_size(mesh))
  return put_resident_train(np.asarray(images), labels, mesh, num_examples=n,
                            row_offset=rows[0])


# ---------------------------------------------------------------------------------------------
