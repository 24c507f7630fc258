"""Data layer: VTAB-1K registry, TFDS / folder / image-folder backends, device pipelines.

Typical iDAT use::

  train = data.open_task_split("dtd", "train800val200", backend="tfds", data_dir=d)
  test = data.open_task_split("dtd", "test", backend="tfds", data_dir=d)
  train_set = data.resident_train_set(train, 224, mesh, cache_dir=c)   # on device
  evals = data.EvalIterator(test, 224, 64, mesh, cache_dir=c)
  # inside the jitted step:  batch = train_set.batch(seed, epoch, step, 64)
  #                          x = data.normalize(batch["image"])       # [-1, 1]
"""

from idat_jax.data.base import (ArraySource, DataError, DataNotPreparedError, Source,
                                SubsetSource, UnknownTaskError, process_range)
from idat_jax.data.cache import cache_entry_dir, load_arrays
from idat_jax.data.digits import DigitsTask, write_digits_task
from idat_jax.data.folder import FolderTaskSource, read_list_file
from idat_jax.data.host_batches import (DEFAULT_RESIDENT_BUDGET_BYTES, EvalIterator,
                                        StreamingTrainIterator)
from idat_jax.data.image_folder import ImageFolderSource, few_shot_count, few_shot_select
from idat_jax.data.loader import BACKENDS, load_task_split, open_task_split, stratified_split
from idat_jax.data.preprocess import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN,
                                      INCEPTION_STD, NORMALIZATIONS, normalization_stats,
                                      normalize, random_resized_crop_flip, resize)
from idat_jax.data.resident import (ResidentTrainSet, batch_indices, epoch_permutation,
                                    gather_batch, put_resident_train, resident_train_set,
                                    steps_per_epoch)
from idat_jax.data.synthetic import SyntheticTaskSource
from idat_jax.data.tfds_backend import TfdsImageSource, TfdsTaskSource
from idat_jax.data.vtab import (ALIASES, DEFAULT_EVAL_SPLIT, DEFAULT_TRAIN_SPLIT, GROUPS,
                                SPLITS, TASKS, VTAB_TASKS, TaskSpec, canonical_name, get_task,
                                tasks_in_group)

__all__ = [
    "ALIASES", "ArraySource", "BACKENDS", "DEFAULT_EVAL_SPLIT", "DEFAULT_RESIDENT_BUDGET_BYTES",
    "DEFAULT_TRAIN_SPLIT", "DataError", "DataNotPreparedError", "DigitsTask", "EvalIterator",
    "FolderTaskSource", "GROUPS", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN",
    "INCEPTION_STD", "ImageFolderSource", "NORMALIZATIONS", "ResidentTrainSet", "SPLITS",
    "Source", "StreamingTrainIterator", "SubsetSource", "SyntheticTaskSource", "TASKS",
    "TaskSpec", "TfdsImageSource", "TfdsTaskSource", "UnknownTaskError", "VTAB_TASKS",
    "batch_indices", "cache_entry_dir",
    "canonical_name", "epoch_permutation", "few_shot_count", "few_shot_select", "gather_batch",
    "get_task", "load_arrays", "load_task_split", "stratified_split", "normalization_stats", "normalize",
    "open_task_split", "process_range", "put_resident_train", "random_resized_crop_flip",
    "read_list_file", "resident_train_set", "resize", "steps_per_epoch", "tasks_in_group",
    "write_digits_task",
]
