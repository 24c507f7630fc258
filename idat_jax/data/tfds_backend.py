"""TFDS backend: VTAB-1K tasks and few-shot image classification from a prepared data dir.

Reads array_record data with ``tfds.data_source`` (random access, no TensorFlow). Data sets
prepared in the tfrecord format are read with tf.data when TensorFlow is importable. Sources
are random access, so each process of a multi-host run reads only its own share (see
``pipeline``). A data dir without the data set raises :class:`DataNotPreparedError` naming
the directory and the ``prepare_vtab.py`` command that fills it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from idat_jax.data import vtab
from idat_jax.data.base import (
  DataError,
  DataNotPreparedError,
  ImageLike,
  Source,
  process_range,
)
from idat_jax.data.image_folder import DEFAULT_FEW_SHOT_SEED, few_shot_select


def resolve_data_dir(data_dir: str | None) -> str:
  """The TFDS data dir: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.fspath(data_dir)
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def prepared_versions(name: str, data_dir: str) -> dict[str, str]:
  """{version: file format} of the versions of ``name`` (e.g. 'eurosat/rgb') in data_dir."""
  base = os.path.join(data_dir, name)
  found = {}
  if os.path.isdir(base):
    for version in sorted(os.listdir(base)):
      info = os.path.join(base, version, "dataset_info.json")
      if os.path.isfile(info):
        with open(info, encoding="utf-8") as f:
          found[version] = json.load(f).get("fileFormat", "tfrecord")
  return found


def prepare_command(task: str, data_dir: str) -> str:
  return f"python scripts/prepare_vtab.py --tasks {task} --data_dir {data_dir}"


class _TfRecordExamples:
  """A tfrecord split read once with tf.data (needs TensorFlow); images decoded lazily."""

  def __init__(self, version_dir: str, split: str):
    builder = tfds.builder_from_directory(version_dir)
    decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    self._image_keys = tuple(decoders)
    self._examples = list(tfds.as_numpy(ds))
    self.dataset_info = builder.info

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self._examples[index])
    for key in self._image_keys:
      with Image.open(io.BytesIO(example[key])) as image:
        example[key] = np.asarray(image).astype(np.uint8)
    return example


def open_data_source(name: str, versions: Sequence[str], split: str, data_dir: str | None,
                     task: str | None = None, decoders: dict | None = None,
                     manual_hint: str | None = None) -> tuple[Any, str]:
  """(random-access examples, version) of the first loadable version of a TFDS data set."""
  data_dir = resolve_data_dir(data_dir)
  errors = []
  for version in versions or ("",):
    spec = f"{name}:{version}" if version else name
    try:
      source = tfds.data_source(spec, split=split, data_dir=data_dir, download=False,
                                decoders=decoders)
    except Exception as e:  # not prepared, wrong version or wrong file format
      errors.append(f"{spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
      continue
    info = getattr(source, "dataset_info", None)
    return source, str(getattr(info, "version", version))
  on_disk = prepared_versions(name, data_dir)
  task = task or name
  # A version this TFDS cannot build (e.g. oxford_iiit_pet 3.x under TFDS 4.9) is still
  # readable from its prepared directory: the metadata there is enough.
  for version in sorted(on_disk, key=tfds.core.Version, reverse=True):
    if on_disk[version] != "array_record" or not any(
        fnmatch.fnmatchcase(version, v) for v in versions or ("*",)):
      continue
    try:
      builder = tfds.builder_from_directory(os.path.join(data_dir, name, version))
      return builder.as_data_source(split=split, decoders=decoders), version
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{name}/{version} (from directory): {type(e).__name__}: {e}")
  if not on_disk:
    hint = f" {manual_hint}" if manual_hint else ""
    raise DataNotPreparedError(
        f"TFDS data set {name!r} (task {task!r}) is not prepared in data dir {data_dir}: "
        f"{os.path.join(data_dir, name)}/<version>/dataset_info.json not found. Prepare it "
        f"with: {prepare_command(task, data_dir)} (needs pip install -e .[tfds-prepare]).{hint}")
  tfrecord = sorted((v for v, fmt in on_disk.items() if fmt == "tfrecord"),
                    key=tfds.core.Version)
  if tfrecord and decoders is None:
    if tensorflow_available():
      version = tfrecord[-1]
      logging.info("reading %s:%s (tfrecord) with tf.data", name, version)
      return _TfRecordExamples(os.path.join(data_dir, name, version), split), version
    raise DataError(
        f"TFDS data set {name!r} in {data_dir} is in the tfrecord format (versions "
        f"{', '.join(tfrecord)}); reading it needs TensorFlow (pip install -e .[tfds-prepare]). "
        f"Or prepare it again as array_record: {prepare_command(task, data_dir)} "
        "--file_format array_record")
  raise DataError(
      f"cannot read TFDS data set {name!r} split {split!r} from {data_dir} (on disk: "
      f"{', '.join(f'{v} ({f})' for v, f in on_disk.items())}; tried versions "
      f"{', '.join(versions)}): " + "; ".join(errors))


def scan_share(count: int, read: Callable[[int], int], process_index: int,
               process_count: int) -> np.ndarray:
  """This process's share (``process_range``) of ``read(i)``, padded to the largest share."""
  start, stop = process_range(count, process_index, process_count)
  out = np.zeros((-(-count // process_count),), np.int32)
  for j, i in enumerate(range(start, stop)):
    out[j] = read(i)
  return out


def assemble_shares(shares: np.ndarray, count: int) -> np.ndarray:
  """[process_count, width] padded shares (process order) -> the ``count`` values in order."""
  process_count = shares.shape[0]
  return np.concatenate([shares[p, :stop - start] for p, (start, stop) in
                         enumerate(process_range(count, p, process_count)
                                   for p in range(process_count))]).astype(np.int32)


def shared_scan(count: int, read: Callable[[int], int]) -> np.ndarray:
  """``[read(i) for i in range(count)]`` as int32; with several JAX processes each reads only
  its share and the shares are gathered.

  Label scans (few-shot selection, stratified splits) read every record of a split (image
  bytes are fetched even when their decoding is skipped): on ImageNet's 1.28M records a
  multi-host run would otherwise read the whole split on every host.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return scan_share(count, read, 0, 1)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  local = scan_share(count, read, jax.process_index(), jax.process_count())
  return assemble_shares(np.asarray(multihost_utils.process_allgather(local)), count)


class _WithoutImages:
  """The examples of a data source with image features left encoded (fast label scans).

  Reads the same underlying records as the source and deserialises them with SkipDecoding
  for images; falls back to the source itself when that is not possible.
  """

  def __init__(self, ds: Any):
    self._ds = ds
    self._read = ds.__getitem__
    info = getattr(ds, "dataset_info", None)
    features = getattr(info, "features", None)
    raw = getattr(ds, "data_source", None)
    if isinstance(ds, _TfRecordExamples) or features is None or raw is None or not len(ds):
      return
    decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
                if isinstance(f, tfds.features.Image)}
    if not decoders:
      return

    def read(index: int) -> Any:
      return features.deserialize_example_np(raw[index], decoders=decoders)

    try:
      read(0)
    except Exception:  # pylint: disable=broad-except
      return
    self._read = read

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> Any:
    return self._read(index)


class TfdsTaskSource(Source):
  """One split (train800 / val200 / train800val200 / test) of a VTAB-1K task from TFDS."""

  def __init__(self, task: str, split: str = vtab.DEFAULT_TRAIN_SPLIT,
               data_dir: str | None = None):
    self.spec = vtab.get_task(task)
    if not self.spec.has_tfds:
      raise DataError(f"task {self.spec.name!r} has no TFDS source; use the folder backend")
    self.task, self.split = self.spec.name, split
    self.tfds_split = self.spec.tfds_split(split)
    self.data_dir = resolve_data_dir(data_dir)
    self._ds, self.version = open_data_source(
        self.spec.tfds_name, self.spec.tfds_versions, self.tfds_split, self.data_dir,
        task=self.task, manual_hint=self.spec.manual_download)
    self.num_classes = self.spec.num_classes
    self.name = f"tfds:{self.task}/{split}"
    logging.info("TFDS %s:%s split %s (%s) for task %s: %d examples", self.spec.tfds_name,
                 self.version, self.tfds_split, split, self.task, len(self._ds))

  def __len__(self) -> int:
    return len(self._ds)

  def _where(self, index: int) -> str:
    return (f"task {self.task} split {self.split} ({self.spec.tfds_name}:{self.version} "
            f"{self.tfds_split}) example {index}")

  def _label(self, example: Any, index: int) -> int:
    try:
      label = self.spec.label_fn(example)
    except Exception as e:
      raise DataError(f"{self._where(index)}: label transform failed: {e}") from e
    return self.check_label(label, self._where(index))

  def get(self, index: int) -> tuple[ImageLike, int]:
    example = self._ds[index]
    return self.spec.image_fn(example), self._label(example, index)

  def labels(self) -> np.ndarray:
    """Labels without decoding images when the format allows it (array_record + SkipDecoding)."""
    examples = _WithoutImages(self._ds)
    return shared_scan(len(examples), lambda i: self._label(examples[i], i))

  def cache_parts(self) -> tuple[str, ...]:
    return ("tfds", self.task, self.split)

  def fingerprint(self) -> str:
    return (f"tfds:{os.path.abspath(self.data_dir)}:{self.spec.tfds_name}:{self.version}:"
            f"{self.tfds_split}:{len(self)}")


class TfdsImageSource(Source):
  """A TFDS image classification split (e.g. cifar100, imagenet2012) with a few-shot subset.

  Same rule as the image-folder backend: per class, examples in TFDS order, a seeded shuffle,
  ``int(n * fraction)`` (at least one) kept.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               fraction: float = 1.0, seed: int = DEFAULT_FEW_SHOT_SEED,
               image_key: str = "image", label_key: str = "label"):
    self.data_dir = resolve_data_dir(data_dir)
    base, _, version = name.partition(":")
    self._ds, self.version = open_data_source(base, (version,) if version else (), split,
                                              self.data_dir)
    self.tfds_name, self.split = base, split
    self.image_key, self.label_key = image_key, label_key
    info = getattr(self._ds, "dataset_info", None)
    feature = info.features[label_key] if info is not None else None
    all_labels = self._all_labels()
    self.num_classes = int(getattr(feature, "num_classes", 0) or all_labels.max() + 1)
    by_class = [np.nonzero(all_labels == c)[0].tolist() for c in range(self.num_classes)]
    names = getattr(feature, "names", None)
    self.indices = np.asarray(
        [i for chosen in few_shot_select(by_class, fraction, seed, names) for i in chosen],
        np.int64)
    self._labels = all_labels[self.indices]
    self.fraction, self.seed = fraction, seed
    self.name = f"tfds:{base}/{split}"

  def _all_labels(self) -> np.ndarray:
    examples = _WithoutImages(self._ds)
    return shared_scan(len(examples), lambda i: int(examples[i][self.label_key]))

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  def get(self, index: int) -> tuple[ImageLike, int]:
    example = self._ds[int(self.indices[index])]
    return vtab.to_rgb(example[self.image_key]), int(self._labels[index])

  def labels(self) -> np.ndarray:
    return self._labels.copy()

  def cache_parts(self) -> tuple[str, ...]:
    return ("tfds_images", self.tfds_name.replace("/", "_"),
            f"{self.split}_a{self.fraction:g}_s{self.seed}")

  def fingerprint(self) -> str:
    return (f"tfds_images:{os.path.abspath(self.data_dir)}:{self.tfds_name}:{self.version}:"
            f"{self.split}:{len(self)}:{int(self.indices.sum())}")
