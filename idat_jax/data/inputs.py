"""Train and eval inputs of a run, built from ``config.data`` on the data layer's readers.

Two training modes behind one interface:

* resident (VTAB-1K, folder/TFDS backends): the decoded set lives on the devices and the train
  step draws its batch inside jit from (seed, step), so an epoch costs no host work;
* streamed (WeCoLoRA's augmented image folders): the host decodes and augments each batch
  deterministically from (seed, epoch, index) and prefetches it in the background.

Every input also carries how its batches become the model's input inside the jitted step
(:attr:`TrainData.model_batch`, :attr:`EvalData.model_input`): uint8 images are normalised
there, cached features (``data/features.py``) pass through. The trainer therefore needs no
case per kind of input; a method picks its inputs in its ``open_inputs``/``prepare_inputs``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
from jax.sharding import Mesh

from idat_jax import fileio
from idat_jax.data import loader, preprocess
from idat_jax.data.base import Source
from idat_jax.data.host_batches import EvalIterator, StreamingTrainIterator
from idat_jax.data.resident import ResidentTrainSet, resident_train_set

Batch = Mapping[str, jax.Array]


def sibling_dir(workdir: str, name: str) -> str:
  """``<workdir>/../<name>``: where the runs of one sweep share a cache (local or gs://)."""
  if fileio.is_remote(workdir):
    return posixpath.join(posixpath.dirname(workdir.rstrip("/")), name)
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), name)


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The decode cache: ``data.cache_dir``, else beside a local work dir, else (gs:// work dir)
  this host's ``~/.cache/idat_jax/cache``: it is memory-mapped, so it must be local."""
  if config.data.cache_dir:
    return config.data.cache_dir
  if fileio.is_remote(workdir):
    return fileio.host_cache_dir("cache")
  return sibling_dir(workdir, "cache")


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
      few_shot_seed=d.few_shot_seed, image_size=d.image_size, train_split=d.train_split)
  if d.stratified_split:
    source = loader.stratified_split(source, d.stratified_split,
                                     "train" if is_train else "test", d.stratified_seed)
  return source


@dataclasses.dataclass(frozen=True)
class DataFacts:
  """What a run learns from its training split before any model exists."""
  num_examples: int
  num_classes: int


def data_facts(config: ml_collections.ConfigDict, source: Source) -> DataFacts:
  """The training split's facts; a given ``config.data.num_classes`` must match the data."""
  given = config.data.num_classes
  if given is not None and source.num_classes != given:
    raise ValueError(f"config.data.num_classes={given} but {source.name} has "
                     f"{source.num_classes} classes")
  return DataFacts(len(source), source.num_classes)


def normalizer(name: str, *, evaluation: bool = False) -> Callable[[jax.Array], jax.Array]:
  """uint8 images -> float, on the device ('inception': [-1, 1]; 'imagenet': mean/std);
  ``evaluation``: with the statistics the reference evaluates with (they may differ)."""
  mean, std = preprocess.normalization_stats(name, evaluation=evaluation)
  return functools.partial(preprocess.normalize, mean=mean, std=std)


def image_batch(normalization: str) -> Callable[[Batch], Batch]:
  """Inside jit: the batch with its uint8 ``image`` normalised (what image models train on)."""
  normalize = normalizer(normalization)
  return lambda batch: dict(batch, image=normalize(batch["image"]))


def image_input(normalization: str) -> Callable[[Batch], jax.Array]:
  """Inside jit: an eval batch's normalised images (the evaluated model's input)."""
  normalize = normalizer(normalization, evaluation=True)
  return lambda batch: normalize(batch["image"])


@dataclasses.dataclass
class TrainData:
  """The training input of a run (see the module docstring).

  ``model_batch`` turns a raw batch into the one the method's loss reads, inside jit (e.g.
  :func:`image_batch`).
  """
  num_examples: int
  num_classes: int
  model_batch: Callable[[Batch], Batch]
  resident: ResidentTrainSet | None = None
  stream: StreamingTrainIterator | None = None
  _iter: Iterator | None = None
  _next_step: int = -1

  def batch_in_step(self, data, seed: int, step: jax.Array, steps_per_epoch: int,
                    global_batch: int) -> dict[str, jax.Array]:
    """Inside jit: the loss's batch of ``step``, drawn from the resident set or ``data``
    itself (streamed), through :attr:`model_batch`."""
    if self.resident is None:
      batch = data
    else:
      batch = data.batch(seed, step // steps_per_epoch, step % steps_per_epoch, global_batch)
    return self.model_batch(batch)

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


@dataclasses.dataclass
class EvalData:
  """The eval split as padded, masked batches, and how one becomes the evaluated model's input.

  ``batches`` is re-iterable and has ``num_examples`` (:class:`EvalIterator` of images, or
  ``data.features.FeatureEval``); ``model_input`` runs inside the jitted eval step.
  """
  batches: Any
  model_input: Callable[[Batch], jax.Array]

  @property
  def num_examples(self) -> int:
    return self.batches.num_examples

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.batches)


def build_train(config: ml_collections.ConfigDict, mesh: Mesh, workdir: str) -> TrainData:
  """The training split's images: streamed and augmented (``data.augment``) or resident."""
  d = config.data
  source = build_source(config, d.train_split)
  facts = data_facts(config, source)
  model_batch = image_batch(d.normalization)
  if d.augment:
    stream = StreamingTrainIterator(
        source, d.image_size, config.batch_size, mesh, seed=config.seed, augment=True,
        scale=tuple(d.crop_scale))
    return TrainData(facts.num_examples, facts.num_classes, model_batch, stream=stream)
  resident = resident_train_set(source, d.image_size, mesh, cache_dir=cache_dir(config, workdir))
  return TrainData(facts.num_examples, facts.num_classes, model_batch, resident=resident)


def build_eval(config: ml_collections.ConfigDict, mesh: Mesh, workdir: str,
               source: Source | None = None) -> EvalData:
  """The eval split's images (``source``: the split if the caller already opened it)."""
  d = config.data
  source = source if source is not None else build_source(config, d.eval_split)
  batches = EvalIterator(source, d.image_size, config.eval_batch_size, mesh,
                         resident_budget_bytes=int(d.eval_resident_mb) << 20,
                         cache_dir=cache_dir(config, workdir))
  return EvalData(batches, image_input(d.normalization))
