"""Train and eval inputs of a run, built from ``config.data`` on top of ``idat_jax.data``.

Two training modes behind one interface:

* resident (VTAB-1K, folder/TFDS backends): the decoded set lives on the devices and the train
  step draws its batch inside jit from (seed, step), so an epoch costs no host work;
* streamed (WeCoLoRA's augmented image folders): the host decodes and augments each batch
  deterministically from (seed, epoch, index) and prefetches it in the background.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
from typing import Callable, Iterator

import jax
import ml_collections
from jax.sharding import Mesh

from idat_jax.data import loader, pipeline, preprocess
from idat_jax.data.base import Source


def sibling_dir(workdir: str, name: str) -> str:
  """``<workdir>/../<name>``: where the runs of one sweep share caches (local or gs://)."""
  if "://" in workdir:
    return posixpath.join(posixpath.dirname(workdir.rstrip("/")), name)
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), name)


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.cache_dir or sibling_dir(workdir, "cache")


def build_source(config: ml_collections.ConfigDict, split: str) -> Source:
  """The data source of one split, as ``config.data`` describes it.

  The few-shot fraction applies to the training split only; with ``stratified_split`` > 0 the
  train and eval splits are the two sides of a stratified split of ``train_split``.
  """
  d = config.data
  if d.backend == "folder" and not d.root:
    raise ValueError("config.data.root is empty: the folder backend reads "
                     "<root>/<task>/<split>.txt (see scripts/prepare_vtab.py --export_folder)")
  is_train = split == d.train_split
  base_split = d.train_split if d.stratified_split else split
  source = loader.open_task_split(
      d.task, base_split, backend=d.backend,
      data_dir=(d.tfds_data_dir if d.backend.startswith("tfds") else d.root) or None,
      num_classes=d.num_classes if d.backend == "folder" else None,
      few_shot=d.few_shot_ratio if is_train and not d.stratified_split else 1.0,
      few_shot_seed=d.few_shot_seed, image_size=d.image_size)
  if d.stratified_split:
    source = loader.stratified_split(source, d.stratified_split,
                                     "train" if is_train else "test", d.stratified_seed)
  return source


def normalizer(name: str) -> Callable[[jax.Array], jax.Array]:
  """uint8 images -> float, on the device ('inception': [-1, 1]; 'imagenet': mean/std)."""
  preprocess.normalization_stats(name)  # validates the name early
  return functools.partial(preprocess.normalize, mean=name)


@dataclasses.dataclass
class TrainData:
  """The training input of a run (see the module docstring)."""
  num_examples: int
  num_classes: int
  resident: pipeline.ResidentTrainSet | None = None
  stream: pipeline.StreamingTrainIterator | None = None
  # 'image' (uint8 images, normalised in the step) or 'feature' (cached backbone features).
  kind: str = "image"
  _iter: Iterator | None = None
  _next_step: int = -1

  def batch_in_step(self, data, seed: int, step: jax.Array, steps_per_epoch: int,
                    global_batch: int) -> dict[str, jax.Array]:
    """Inside jit: the uint8 batch of ``step`` (resident) or ``data`` itself (streamed)."""
    if self.resident is None:
      return data
    batch = data.batch(seed, step // steps_per_epoch, step % steps_per_epoch, global_batch)
    if self.kind == "feature":
      batch = {"feature": batch["image"], "label": batch["label"]}
    return batch

  def stream_batch(self, step: int, steps_per_epoch: int, global_batch: int) -> dict:
    """Host side, streamed mode: the global batch of ``step`` (resumes mid-epoch)."""
    epoch, pos = divmod(step, steps_per_epoch)
    if self._iter is None or step != self._next_step or pos == 0:
      if self._iter is not None:
        self._iter.close()
      self._iter = self.stream.epoch(epoch, pos)
    self._next_step = step + 1
    return next(self._iter)

  def close(self) -> None:
    if self._iter is not None:
      self._iter.close()
      self._iter = None


def build_train(config: ml_collections.ConfigDict, mesh: Mesh, workdir: str) -> TrainData:
  d = config.data
  source = build_source(config, d.train_split)
  if d.num_classes is not None and source.num_classes != d.num_classes:
    raise ValueError(f"config.data.num_classes={d.num_classes} but {source.name} has "
                     f"{source.num_classes} classes")
  if d.augment:
    stream = pipeline.StreamingTrainIterator(
        source, d.image_size, config.batch_size, mesh, seed=config.seed, augment=True,
        scale=tuple(d.crop_scale))
    return TrainData(len(source), source.num_classes, stream=stream)
  resident = pipeline.resident_train_set(source, d.image_size, mesh,
                                         cache_dir=cache_dir(config, workdir))
  return TrainData(len(source), source.num_classes, resident=resident)


def build_eval(config: ml_collections.ConfigDict, mesh: Mesh, workdir: str,
               source: Source | None = None) -> pipeline.EvalIterator:
  """The eval split's batches (``source``: the split if the caller already opened it)."""
  d = config.data
  source = source if source is not None else build_source(config, d.eval_split)
  return pipeline.EvalIterator(source, d.image_size, config.eval_batch_size, mesh,
                               resident_budget_bytes=int(d.eval_resident_mb) << 20,
                               cache_dir=cache_dir(config, workdir))


EvalData = pipeline.EvalIterator
