"""Folder and image-folder backends, few-shot subsets, the disk cache and the digits task."""

import collections
import os
import random

import numpy as np
import pytest
from PIL import Image

from idat_jax import data
from idat_jax.data import cache, digits, folder, image_folder


def _image(value: int, size=(6, 5)) -> np.ndarray:
  """A small RGB image whose pixels encode ``value`` (distinct per channel)."""
  h, w = size
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = value % 251
  img[..., 1] = (3 * value) % 251
  img[..., 2] = np.arange(w)[None, :] * 10
  return img


def _write_task(root, task="dtd", n=12, num_classes=47, fmt_cycle=("png", "jpg")):
  """A folder task with lossless PNG and lossy JPEG images; returns the true arrays."""
  task_dir = root / task
  (task_dir / "images" / "test").mkdir(parents=True)
  lines, arrays, labels = [], [], []
  for i in range(n):
    ext = fmt_cycle[i % len(fmt_cycle)]
    rel = f"images/test/{i:06d}.{ext}"
    arr = _image(i)
    Image.fromarray(arr).save(task_dir / rel, quality=95)
    label = (7 * i) % num_classes
    lines.append(f"{rel} {label}")
    arrays.append(arr)
    labels.append(label)
  (task_dir / "test.txt").write_text("\n".join(lines) + "\n")
  return task_dir, np.stack(arrays), np.asarray(labels)


def test_folder_backend_reads_png_and_jpeg(tmp_path):
  task_dir, arrays, labels = _write_task(tmp_path)
  source = data.open_task_split("dtd", "test", backend="folder", data_dir=str(tmp_path))
  assert isinstance(source, data.FolderTaskSource)
  assert (len(source), source.num_classes) == (12, 47)
  np.testing.assert_array_equal(source.labels(), labels)
  images, got_labels = data.load_arrays(source, 5, num_workers=2)
  assert images.shape == (12, 5, 5, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(got_labels, labels)
  for i in range(12):
    expected = data.resize(arrays[i], 5)
    if i % 2 == 0:  # PNG is lossless: exactly PIL's bicubic resize of the original
      np.testing.assert_array_equal(images[i], expected)
    else:  # JPEG: close to it
      assert np.abs(images[i].astype(int) - expected.astype(int)).mean() < 6
  # Native size requested: no resize at all.
  image, label = source.get(0)
  np.testing.assert_array_equal(np.asarray(image), arrays[0])
  assert label == labels[0]
  # Aliases resolve to the folder name; the default split is train800val200.
  (task_dir / "train800val200.txt").write_text("images/test/000000.png 3\n")
  src = data.open_task_split("dtd", backend="folder", data_dir=str(tmp_path))
  assert (src.split, len(src), src.labels().tolist()) == ("train800val200", 1, [3])


def test_folder_resize_is_direct_bicubic():
  img = np.zeros((4, 8, 3), np.uint8)
  img[:, 4:] = 200
  out = data.resize(img, 6)
  expected = np.asarray(Image.fromarray(img).resize((6, 6), Image.BICUBIC))
  np.testing.assert_array_equal(out, expected)
  assert out.shape == (6, 6, 3)
  assert out[:, 0].max() < 20 and out[:, -1].min() > 180  # no crop: both halves survive


def test_folder_errors_name_file_and_line(tmp_path):
  task_dir, _, _ = _write_task(tmp_path, n=3)
  with pytest.raises(data.DataNotPreparedError) as err:
    data.FolderTaskSource(str(tmp_path), "dtd", "train800")
  assert str(task_dir / "train800.txt") in str(err.value)
  assert "prepare_vtab.py" in str(err.value)
  with pytest.raises(data.DataNotPreparedError, match="svhn"):
    data.FolderTaskSource(str(tmp_path), "svhn", "test")

  list_file = task_dir / "test.txt"
  list_file.write_text("images/test/000000.png 1\n\nimages/test/000001.jpg\n")
  with pytest.raises(data.DataError, match=rf"{list_file}:3: malformed line"):
    data.FolderTaskSource(str(tmp_path), "dtd", "test")
  list_file.write_text("images/test/000000.png one\n")
  with pytest.raises(data.DataError, match=rf"{list_file}:1: .*not an integer"):
    data.FolderTaskSource(str(tmp_path), "dtd", "test")
  list_file.write_text("images/test/000000.png 1\nimages/test/000001.jpg 47\n")
  with pytest.raises(data.DataError, match=rf"{list_file}:2: label 47 is outside \[0, 47\)"):
    data.FolderTaskSource(str(tmp_path), "dtd", "test")
  list_file.write_text("images/test/000000.png -1\n")
  with pytest.raises(data.DataError, match=rf"{list_file}:1: label -1"):
    data.FolderTaskSource(str(tmp_path), "dtd", "test")

  (task_dir / "images" / "test" / "broken.jpg").write_bytes(b"not a jpeg at all")
  list_file.write_text("images/test/000000.png 1\nimages/test/broken.jpg 2\n"
                       "images/test/missing.png 3\n")
  source = data.FolderTaskSource(str(tmp_path), "dtd", "test")
  assert source.get(0)[1] == 1
  with pytest.raises(data.DataError, match=rf"{list_file}:2: cannot read image .*broken.jpg"):
    source.get(1)
  with pytest.raises(data.DataError, match=rf"{list_file}:3: cannot read image .*missing.png"):
    data.load_arrays(source, 4, rows=(2, 3))


def test_unregistered_folder_task_infers_classes(tmp_path):
  _write_task(tmp_path, task="my_task", n=4, num_classes=5)  # labels 0, 2, 4, 1
  source = data.FolderTaskSource(str(tmp_path), "my_task", "test")
  assert source.num_classes == 5
  assert data.FolderTaskSource(str(tmp_path), "my_task", "test", num_classes=9).num_classes == 9


def test_disk_cache_second_load_does_not_decode(tmp_path, monkeypatch):
  _write_task(tmp_path, n=6)
  cache_dir = tmp_path / "cache"
  source = data.FolderTaskSource(str(tmp_path), "dtd", "test")
  first = data.load_arrays(source, 8, cache_dir=str(cache_dir))
  entry = data.cache_entry_dir(str(cache_dir), source, 8)
  assert entry.startswith(str(cache_dir / "folder" / "dtd" / "test_8px_"))
  assert sorted(os.listdir(entry)) == ["images.npy", "labels.npy", "meta.json", "stamps.npy"]

  def no_decoding(*args, **kwargs):
    raise AssertionError("image decoded although cached")

  monkeypatch.setattr(Image, "open", no_decoding)
  monkeypatch.setattr(data.FolderTaskSource, "get", no_decoding)
  again = data.load_arrays(data.FolderTaskSource(str(tmp_path), "dtd", "test"), 8,
                           cache_dir=str(cache_dir))
  np.testing.assert_array_equal(np.asarray(again[0]), first[0])
  np.testing.assert_array_equal(again[1], first[1])
  with pytest.raises(AssertionError, match="decoded although cached"):  # other size: decodes
    data.load_arrays(source, 7, cache_dir=str(cache_dir))
  assert not [p for p in os.listdir(os.path.dirname(entry)) if ".tmp-" in p]  # cleaned up


def test_disk_cache_rows_and_invalidation(tmp_path):
  task_dir, _, _ = _write_task(tmp_path, n=6)
  cache_dir = str(tmp_path / "cache")
  source = data.FolderTaskSource(str(tmp_path), "dtd", "test")
  full = data.load_arrays(source, 4, cache_dir=cache_dir)
  part = data.load_arrays(source, 4, rows=(2, 5), cache_dir=cache_dir)
  np.testing.assert_array_equal(part[0], full[0][2:5])
  assert data.cache_entry_dir(cache_dir, source, 4, (2, 5)).endswith("_rows2-5")
  # A changed list file changes the fingerprint, hence the entry.
  lines = (task_dir / "test.txt").read_text().splitlines()
  (task_dir / "test.txt").write_text("\n".join(lines[:4]) + "\n")
  changed = data.FolderTaskSource(str(tmp_path), "dtd", "test")
  assert data.cache_entry_dir(cache_dir, changed, 4) != data.cache_entry_dir(cache_dir, source, 4)
  assert data.load_arrays(changed, 4, cache_dir=cache_dir)[0].shape == (4, 4, 4, 3)


def _write_image_tree(root, sizes):
  for c, n in sizes.items():
    (root / c).mkdir(parents=True)
    for i in range(n):
      sub = root / c / ("nested" if i % 4 == 3 else "")
      sub.mkdir(exist_ok=True)
      Image.fromarray(_image(i, (5, 7))).save(sub / f"img_{i:03d}.{'png' if i % 2 else 'JPEG'}")
  (root / next(iter(sizes)) / "notes.txt").write_text("not an image")


def test_few_shot_subset_is_class_balanced_and_reproducible(tmp_path, monkeypatch):
  sizes = {"n01": 10, "n02": 7, "n03": 3, "n04": 1}
  _write_image_tree(tmp_path / "train", sizes)
  root = str(tmp_path / "train")
  source = data.ImageFolderSource(root, fraction=0.3)
  assert source.classes == ["n01", "n02", "n03", "n04"]
  assert np.bincount(source.labels()).tolist() == [3, 2, 1, 1]  # int(n * 0.3), at least 1
  assert all(p.startswith(source.classes[label]) for p, label in
             zip(source.paths, source.labels()))
  assert not any(p.endswith(".txt") for p in source.paths)
  assert data.ImageFolderSource(root, fraction=0.3).paths == source.paths
  assert data.ImageFolderSource(root, fraction=0.3, seed=13).paths != source.paths
  assert len(data.ImageFolderSource(root).paths) == 21

  real_scandir = os.scandir

  class Shuffled:
    def __init__(self, path):
      self._it = real_scandir(path)
      self._entries = list(self._it)
      random.Random(str(path)).shuffle(self._entries)
      self._entries.reverse()

    def __iter__(self):
      return iter(self._entries)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._it.close()

  monkeypatch.setattr(os, "scandir", Shuffled)
  shuffled = data.ImageFolderSource(root, fraction=0.3)
  assert shuffled.paths == source.paths
  np.testing.assert_array_equal(shuffled.labels(), source.labels())

  image, label = source.get(0)
  assert image.size == (7, 5) and label == 0


def test_few_shot_rule_matches_sklearn_shuffle_and_rejects_empty_classes(tmp_path):
  from sklearn.utils import shuffle
  names = [f"f{i:02d}" for i in range(23)]
  chosen = data.few_shot_select([names], 0.3, seed=12)[0]
  assert chosen == sorted(shuffle(names, random_state=12)[:6])
  assert data.few_shot_count(1300, 0.01) == 13 and data.few_shot_count(5, 0.01) == 1
  with pytest.raises(data.DataError, match="class 'b' has no examples"):
    data.few_shot_select([["x"], []], 0.5, class_names=["a", "b"])
  with pytest.raises(data.DataError, match="fraction"):
    data.few_shot_select([["x"]], 0.0)
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  Image.fromarray(_image(1)).save(tmp_path / "a" / "x.png")
  with pytest.raises(data.DataError, match=f"{tmp_path / 'b'} holds no images"):
    data.ImageFolderSource(str(tmp_path), fraction=0.5)
  with pytest.raises(data.DataNotPreparedError, match="does not exist"):
    data.ImageFolderSource(str(tmp_path / "nope"))


def test_tfds_few_shot_subset_on_mock_data(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE,
                              mock_array_record_data_source=tfds.testing.PickableDataSourceMock()):
    all_labels = data.TfdsImageSource("cifar10", "train", str(tmp_path)).labels()
    source = data.TfdsImageSource("cifar10", "train", str(tmp_path), fraction=0.5)
    again = data.TfdsImageSource("cifar10", "train", str(tmp_path), fraction=0.5)
    image, label = source.get(0)
  counts = np.bincount(all_labels, minlength=10)
  assert len(all_labels) == 60 and counts.min() >= 1 and source.num_classes == 10
  assert np.bincount(source.labels(), minlength=10).tolist() == [
      max(1, int(c * 0.5)) for c in counts]
  np.testing.assert_array_equal(source.indices, again.indices)
  assert image.shape == (32, 32, 3) and label == source.labels()[0]


def test_digits_task_counts_labels_and_round_trip(tmp_path):
  info = data.write_digits_task(str(tmp_path))
  assert info.counts == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
  src_images, src_targets = digits.digits_uint8()
  assert src_images.shape == (1797, 8, 8) and src_images.max() == 255
  source_pairs = collections.Counter((im.tobytes(), int(t))
                                     for im, t in zip(src_images, src_targets))
  written = collections.Counter()
  for split in ("train800val200", "test"):
    source = data.open_task_split("digits", split, backend="folder", data_dir=str(tmp_path))
    assert source.num_classes == 10
    images, labels = data.load_arrays(source, 8, num_workers=1)
    assert (images[..., 0] == images[..., 2]).all()  # grey tiled to RGB
    written.update((im[..., 0].tobytes(), int(l)) for im, l in zip(images, labels))
  assert written == source_pairs  # every digit exactly once, with its label
  train = data.FolderTaskSource(str(tmp_path), "digits", "train800val200").labels()
  expected = np.bincount(src_targets) * 1000 / 1797
  assert np.abs(np.bincount(train) - expected).max() <= 1  # stratified
  t800 = data.FolderTaskSource(str(tmp_path), "digits", "train800").entries
  v200 = data.FolderTaskSource(str(tmp_path), "digits", "val200").entries
  both = data.FolderTaskSource(str(tmp_path), "digits", "train800val200").entries
  assert [e.path for e in both] == [e.path for e in t800 + v200]


def test_digits_task_remap_and_idempotence(tmp_path):
  info = data.write_digits_task(str(tmp_path), name="digits_5to9", classes=range(5, 10),
                                train_size=500, seed=3)
  _, targets = digits.digits_uint8()
  n = int(np.isin(targets, range(5, 10)).sum())
  assert info.num_classes == 5
  assert info.counts == {"train800": 400, "val200": 100, "train800val200": 500, "test": n - 500}
  lookup = {}
  src_images, _ = digits.digits_uint8()
  for im, t in zip(src_images, targets):
    lookup.setdefault(im.tobytes(), set()).add(int(t))
  source = data.FolderTaskSource(str(tmp_path), "digits_5to9", "test")
  assert source.num_classes == 5  # from task.json
  images, labels = data.load_arrays(source, 8, num_workers=1)
  assert set(labels.tolist()) == {0, 1, 2, 3, 4}
  for im, label in zip(images, labels):
    assert 5 + int(label) in lookup[im[..., 0].tobytes()]  # label i is digit classes[i]

  meta = os.path.join(info.task_dir, folder.TASK_METADATA)
  stamp = os.stat(meta).st_mtime_ns
  data.write_digits_task(str(tmp_path), name="digits_5to9", classes=range(5, 10),
                         train_size=500, seed=3)
  assert os.stat(meta).st_mtime_ns == stamp  # consistent: left untouched
  os.remove(os.path.join(info.task_dir, "val200.txt"))
  data.write_digits_task(str(tmp_path), name="digits_5to9", classes=range(5, 10),
                         train_size=500, seed=3)
  assert len(data.FolderTaskSource(str(tmp_path), "digits_5to9", "val200")) == 100
  other = data.write_digits_task(str(tmp_path), name="digits_5to9", classes=(9, 8),
                                 train_size=100, seed=3)
  assert other.counts["train800val200"] == 100
  assert data.FolderTaskSource(str(tmp_path), "digits_5to9", "test").num_classes == 2
  (tmp_path / "precious").mkdir()
  with pytest.raises(data.DataError, match="not a digits task"):
    data.write_digits_task(str(tmp_path), name="precious")
  with pytest.raises(data.DataError, match="train_size"):
    data.write_digits_task(str(tmp_path), name="d2", classes=(0, 1), train_size=5000)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_cache_entry_is_none_for_uncacheable_sources(tmp_path):
  source = data.ArraySource(np.zeros((2, 3, 3, 3), np.uint8), [0, 1])
  assert data.cache_entry_dir(str(tmp_path), source, 3) is None
  images, labels = data.load_arrays(source, 3, cache_dir=str(tmp_path))
  assert images.shape == (2, 3, 3, 3) and labels.tolist() == [0, 1]
  assert os.listdir(tmp_path) == []
  assert cache.default_num_workers() >= 1 and image_folder.DEFAULT_FEW_SHOT_SEED == 12
