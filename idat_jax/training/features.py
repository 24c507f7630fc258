"""Feature caching for methods that train on a frozen backbone's outputs (linear probing).

Every example of the train and eval splits goes once through the backbone (unaugmented,
padded and masked batches, so multi-host shares are covered exactly once); the features are
then kept on the devices, so the probe's epochs cost only its own tiny matmuls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idat_jax import sharding as shd
from idat_jax.data import pipeline


def extract(feature_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
            batches: pipeline.EvalIterator, normalize: Callable) -> tuple[np.ndarray, np.ndarray]:
  """(features, labels) of every example of ``batches``, on the host of every process.

  ``feature_fn(params, images)``; params are an argument (not baked into the compiled code).
  """
  fn = jax.jit(lambda p, b: (feature_fn(p, normalize(b["image"])), b["label"], b["mask"]))
  feats, labels = [], []
  for batch in batches:
    f, y, m = fn(params, batch)
    if jax.process_count() > 1:
      f, y, m = multihost_utils.process_allgather((f, y, m), tiled=True)
    else:
      f, y, m = jax.device_get((f, y, m))
    feats.append(np.asarray(f)[m])
    labels.append(np.asarray(y)[m])
  feats, labels = np.concatenate(feats), np.concatenate(labels).astype(np.int32)
  if feats.shape[0] != batches.num_examples:
    raise RuntimeError(f"feature extraction covered {feats.shape[0]} of "
                       f"{batches.num_examples} examples")
  return feats, labels


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
