"""The stratified train/test split (WeCoLoRA's RESISC45 protocol) and the unified loader."""

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from idat_jax import data
from idat_jax.data import inputs
from idat_jax import config_lib


def _array_source(per_class=(30, 50, 20), size=4):
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int32)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (labels.size, size, size, 3), dtype=np.uint8)
  return data.ArraySource(images, labels, num_classes=len(per_class))


def test_stratified_split_is_sklearns_split_and_partitions_the_set():
  src = _array_source()
  train = data.stratified_split(src, 0.1, "train", seed=0)
  test = data.stratified_split(src, 0.1, "test", seed=0)
  ref_train, ref_test = train_test_split(np.arange(len(src)), train_size=0.1,
                                         stratify=src.labels(), random_state=0)
  np.testing.assert_array_equal(train.indices, np.sort(ref_train))
  np.testing.assert_array_equal(test.indices, np.sort(ref_test))
  assert set(train.indices).isdisjoint(test.indices)
  assert len(train) + len(test) == len(src)
  # 10% of each class (30, 50, 20 -> 3, 5, 2) in train.
  np.testing.assert_array_equal(np.bincount(train.labels(), minlength=3), [3, 5, 2])
  # Examples are served from the parent source, labels travel with them.
  for i in range(len(train)):
    image, label = train.get(i)
    parent_image, parent_label = src.get(int(train.indices[i]))
    np.testing.assert_array_equal(image, parent_image)
    assert label == parent_label == train.labels()[i]


def test_stratified_split_depends_on_the_seed_and_rejects_bad_arguments():
  src = _array_source()
  a = data.stratified_split(src, 0.2, "train", seed=0).indices
  b = data.stratified_split(src, 0.2, "train", seed=1).indices
  assert not np.array_equal(a, b)
  with pytest.raises(data.DataError, match="fraction"):
    data.stratified_split(src, 1.0, "train")
  with pytest.raises(data.DataError, match="side"):
    data.stratified_split(src, 0.1, "validation")


def test_config_stratified_split_gives_disjoint_train_and_eval_sources(tmp_path):
  for c, n in ((0, 20), (1, 30)):
    d = tmp_path / "train" / f"class{c}"
    d.mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((6, 6, 3), 10 * c + i, np.uint8)).save(d / f"{i:03d}.png")
  config = config_lib.base_config()
  config.data.update(dict(backend="image_folder", root=str(tmp_path), task="folder",
                          train_split="train", eval_split="train", stratified_split=0.1,
                          stratified_seed=0))
  train = inputs.build_source(config, "train")
  with config.unlocked():
    config.data.eval_split = "heldout"
  test = inputs.build_source(config, "heldout")
  assert (len(train), len(test)) == (5, 45)
  np.testing.assert_array_equal(np.bincount(train.labels()), [2, 3])
  assert set(train.indices).isdisjoint(test.indices)


def test_loader_few_shot_image_folder_and_unknown_backend(tmp_path):
  for c in range(2):
    d = tmp_path / "train" / f"c{c}"
    d.mkdir(parents=True)
    for i in range(10):
      Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(d / f"{i}.png")
  src = data.open_task_split("x", "train", backend="image_folder", data_dir=str(tmp_path),
                             few_shot=0.3)
  np.testing.assert_array_equal(np.bincount(src.labels()), [3, 3])
  with pytest.raises(data.DataError, match="image_folder"):
    data.open_task_split("x", "train", backend="image_folder")
  with pytest.raises(data.DataError, match="unknown backend"):
    data.open_task_split("x", "train", backend="lmdb", data_dir=str(tmp_path))
