"""Feature caching for methods that train on a frozen backbone's outputs (linear probing).

Every example of the train and eval splits goes once through the backbone (unaugmented,
padded and masked batches, so multi-host shares are covered exactly once); the features are
then kept on the devices, so the probe's epochs cost only its own tiny matmuls. The backbone
is passed in as a function: this layer knows no model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idat_jax import sharding as shd
from idat_jax.data import inputs
from idat_jax.data.base import Source, process_range
from idat_jax.data.host_batches import EvalIterator
from idat_jax.data.resident import put_resident_train


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order of its local data."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def extract(feature_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
            batches: EvalIterator, normalize: Callable) -> tuple[np.ndarray, np.ndarray]:
  """(features, labels) of every example of ``batches`` in source order, on every process.

  ``feature_fn(params, images)``; params are an argument (not baked into the compiled code).
  Each process keeps the rows of its own (contiguous) share, and the shares are gathered once
  at the end in process order: the order does not depend on the number of processes, and the
  resident train set's batches (so the whole probe run) depend on it.
  """
  fn = jax.jit(lambda p, b: (feature_fn(p, normalize(b["image"])), b["label"], b["mask"]))
  feats, labels = [], []
  for batch in batches:
    f, y, m = (_local_rows(a) for a in fn(params, batch))
    feats.append(f[m])
    labels.append(y[m])
  feats, labels = np.concatenate(feats), np.concatenate(labels).astype(np.int32)
  if jax.process_count() > 1:
    feats, labels = _gather_shares(feats, labels, batches.num_examples)
  if feats.shape[0] != batches.num_examples:
    raise RuntimeError(f"feature extraction covered {feats.shape[0]} of "
                       f"{batches.num_examples} examples")
  return feats, labels


def _gather_shares(feats: np.ndarray, labels: np.ndarray,
                   num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """Every process's share (``process_range``), concatenated in process order."""
  count = jax.process_count()
  sizes = [stop - start for start, stop in
           (process_range(num_examples, p, count) for p in range(count))]
  if feats.shape[0] != sizes[jax.process_index()]:
    raise RuntimeError(f"process {jax.process_index()} extracted {feats.shape[0]} features, "
                       f"its share is {sizes[jax.process_index()]}")
  width = max(sizes)
  pad = width - feats.shape[0]
  feats = np.concatenate([feats, np.zeros((pad,) + feats.shape[1:], feats.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  all_feats, all_labels = multihost_utils.process_allgather((feats, labels))
  return (np.concatenate([all_feats[p, :n] for p, n in enumerate(sizes)]),
          np.concatenate([all_labels[p, :n] for p, n in enumerate(sizes)]))


@dataclasses.dataclass
class FeatureEval:
  """Cached eval features as padded, masked batches ``{'feature', 'label', 'mask'}``."""
  features: jax.Array  # [num_batches, global_batch, dim], sharded on axis 1
  labels: jax.Array
  mask: jax.Array
  num_examples: int
  mesh: Mesh

  def __post_init__(self):
    self._take = jax.jit(lambda a, i: jax.tree.map(lambda x: x[i], a),
                         out_shardings=shd.batch_sharded(self.mesh))

  @classmethod
  def create(cls, feats: np.ndarray, labels: np.ndarray, global_batch: int,
             mesh: Mesh) -> "FeatureEval":
    n = feats.shape[0]
    k = max(1, -(-n // global_batch))
    pad = k * global_batch - n
    sharding = NamedSharding(mesh, P(None, shd.DATA_AXIS))

    def put(x):
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      x = x.reshape((k, global_batch) + x.shape[1:])
      return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return cls(put(feats), put(labels), put(np.ones((n,), bool)), n, mesh)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    arrays = {"feature": self.features, "label": self.labels, "mask": self.mask}
    for b in range(self.features.shape[0]):
      yield self._take(arrays, b)


def feature_batch(batch: inputs.Batch) -> dict[str, jax.Array]:
  """Inside jit: a resident feature set's batch (stored under ``image``) as the loss reads it."""
  return {"feature": batch["image"], "label": batch["label"]}


def feature_input(batch: inputs.Batch) -> jax.Array:
  """Inside jit: an eval batch's cached features (the evaluated model's input)."""
  return batch["feature"]


def cached_inputs(config: ml_collections.ConfigDict, mesh: Mesh, workdir: str,
                  feature_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                  train_source: Source, eval_source: Source
                  ) -> tuple[inputs.TrainData, inputs.EvalData]:
  """Runs ``feature_fn(params, images)`` once over the train and eval splits; returns the
  train input (features resident on the devices) and the eval input (cached features)."""
  cache = inputs.cache_dir(config, workdir)
  data = {}
  for split, source in (("train", train_source), ("eval", eval_source)):
    batches = EvalIterator(source, config.data.image_size, config.eval_batch_size, mesh,
                           resident_budget_bytes=0, cache_dir=cache)
    t0 = time.time()
    normalize = inputs.normalizer(config.data.normalization, evaluation=split == "eval")
    data[split] = extract(feature_fn, params, batches, normalize)
    logging.info("cached %d %s features of dim %d in %.1f s", data[split][0].shape[0], split,
                 data[split][0].shape[1], time.time() - t0)
  resident = put_resident_train(*data["train"], mesh)
  train_data = inputs.TrainData(resident.num_examples, train_source.num_classes, feature_batch,
                                resident=resident)
  eval_data = inputs.EvalData(
      FeatureEval.create(*data["eval"], config.eval_batch_size, mesh), feature_input)
  return train_data, eval_data
