"""Device-resident training set, padded evaluation and the streamed pipeline on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idat_jax import data, sharding
from idat_jax.data import host_batches


def _id_source(n: int, size: int = 4) -> data.ArraySource:
  """Example i has label i and its id in pixel (0, 0) channels 0/1."""
  images = np.zeros((n, size, size, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 0, 1] = np.arange(n) // 256
  images[:, 1:, :, 2] = 9
  return data.ArraySource(images, np.arange(n), num_classes=n, name=f"ids{n}")


def _ids(images) -> np.ndarray:
  images = np.asarray(images).astype(np.int64)
  return images[:, 0, 0, 0] + 256 * images[:, 0, 0, 1]


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return sharding.make_mesh()


def test_batch_indices_visit_each_example_at_most_once_per_epoch():
  n, batch = 1000, 64
  assert data.steps_per_epoch(n, batch) == 15  # drop-last: 40 left out
  fn = functools.partial(data.batch_indices, num_examples=n, global_batch=batch)
  whole_epoch = jax.jit(jax.vmap(fn, in_axes=(None, None, 0)))  # one compile, all steps
  epoch0 = np.asarray(whole_epoch(42, 0, jnp.arange(15)))
  assert epoch0.dtype == np.int32 and epoch0.shape == (15, 64)
  assert len(np.unique(epoch0)) == 960 and epoch0.min() >= 0 and epoch0.max() < n
  perm = np.asarray(data.epoch_permutation(42, 0, n))
  assert sorted(perm.tolist()) == list(range(n))
  np.testing.assert_array_equal(epoch0.reshape(-1), perm[:960])  # drop-last: the tail
  np.testing.assert_array_equal(np.asarray(whole_epoch(42, 0, jnp.arange(15))), epoch0)
  epoch1 = np.asarray(whole_epoch(42, 1, jnp.arange(15)))
  assert len(np.unique(epoch1)) == 960
  assert not np.array_equal(epoch0, epoch1)
  assert set(np.setdiff1d(np.arange(n), epoch0)) != set(np.setdiff1d(np.arange(n), epoch1))
  assert not np.array_equal(np.asarray(whole_epoch(43, 0, jnp.arange(15))), epoch0)
  by_key = whole_epoch(jax.random.PRNGKey(42), 0, jnp.arange(15))
  np.testing.assert_array_equal(np.asarray(by_key), epoch0)  # a seed is its PRNGKey
  with pytest.raises(ValueError):
    data.steps_per_epoch(10, 64)


def test_resident_train_set_batches_inside_jit(mesh):
  n, batch = 1003, 64  # not a multiple of 8: padded to 1008
  source = _id_source(n)
  train = data.resident_train_set(source, 4, mesh)
  assert train.num_examples == n and train.images.shape == (1008, 4, 4, 3)
  assert train.images.sharding.is_equivalent_to(sharding.batch_sharded(mesh), 4)
  assert train.steps_per_epoch(batch) == 15

  @jax.jit
  def step(train_set, epoch, step_in_epoch):
    b = train_set.batch(7, epoch, step_in_epoch, batch)
    return b, data.normalize(b["image"])

  seen = []
  for s in range(15):
    b, x = step(train, 0, s)
    assert b["image"].dtype == jnp.uint8 and b["label"].dtype == jnp.int32
    assert b["image"].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 4)
    idx = np.asarray(data.batch_indices(7, 0, s, n, batch))
    np.testing.assert_array_equal(np.asarray(b["label"]), idx)
    np.testing.assert_array_equal(_ids(b["image"]), idx)  # image rows match labels
    np.testing.assert_allclose(np.asarray(x)[:, 1, 1, 2], 9 / 127.5 - 1, rtol=1e-6)
    seen.extend(idx.tolist())
  assert len(set(seen)) == len(seen) == 960 and max(seen) < n  # never a padding row
  again, _ = step(train, 0, 4)
  np.testing.assert_array_equal(np.asarray(again["label"]),
                                np.asarray(data.batch_indices(7, 0, 4, n, batch)))
  other, _ = step(train, 1, 4)
  assert not np.array_equal(np.asarray(other["label"]), np.asarray(again["label"]))


def test_put_resident_train_keeps_dtype_and_checks_rows(mesh):
  features = np.arange(13 * 3, dtype=np.float32).reshape(13, 3) + 0.5  # e.g. cached features
  train = data.put_resident_train(features, np.arange(13), mesh)
  assert train.images.dtype == jnp.float32 and train.images.shape == (16, 3)
  b = jax.jit(lambda t: t.batch(0, 0, 0, 8))(train)
  idx = np.asarray(data.batch_indices(0, 0, 0, 13, 8))
  np.testing.assert_array_equal(np.asarray(b["image"]), features[idx])
  np.testing.assert_array_equal(np.asarray(b["label"]), idx)
  images = np.zeros((16, 2, 2, 3), np.uint8)
  with pytest.raises(ValueError, match="needs rows"):
    data.put_resident_train(images[:8], np.zeros(8, np.int32), mesh, num_examples=16)


@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("global_batch", [24, 64])
def test_padded_eval_counts_711_exactly_once(mesh, resident, global_batch):
  source = _id_source(711)
  evals = data.EvalIterator(source, 4, global_batch, mesh,
                            resident_budget_bytes=1 << 30 if resident else 0)
  assert evals.resident == resident and evals.num_examples == 711
  assert len(evals) == -(-711 // global_batch)
  for _ in range(2):  # re-iterable: one pass per evaluation
    ids, total = [], 0
    for b in evals:
      assert set(b) == {"image", "label", "mask"}
      assert b["image"].shape == (global_batch, 4, 4, 3) and b["mask"].dtype == jnp.bool_
      assert b["label"].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 1)
      mask = np.asarray(b["mask"])
      labels = np.asarray(b["label"])
      np.testing.assert_array_equal(_ids(b["image"])[mask], labels[mask])
      total += int(mask.sum())
      ids.extend(labels[mask].tolist())
    assert total == 711 and sorted(ids) == list(range(711))
  if resident:
    arrays = evals.resident_arrays
    assert arrays["mask"].shape == (len(evals), global_batch)
    assert int(jnp.sum(arrays["mask"])) == 711


@pytest.mark.parametrize("process_count", [2, 3, 5])
def test_eval_shares_over_hosts_count_each_example_once(mesh, process_count):
  # Host-side logic of each simulated process (the global assembly needs real processes).
  source = _id_source(711)
  ids, steps = [], set()
  for p in range(process_count):
    evals = data.EvalIterator(source, 4, 40 * process_count, mesh, process_index=p,
                              process_count=process_count, resident_budget_bytes=0)
    batches = list(evals._local_batches())
    steps.add(len(batches))
    for b in batches:
      assert b["image"].shape[0] == 40
      ids.extend(b["label"][b["mask"]].tolist())
  assert len(steps) == 1  # every host runs the same number of eval steps
  assert sorted(ids) == list(range(711))
  shares = [data.process_range(711, p, process_count) for p in range(process_count)]
  assert shares[0][0] == 0 and shares[-1][1] == 711
  assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
  assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def test_eval_streams_from_the_disk_cache(mesh, tmp_path, monkeypatch):
  root = tmp_path / "vtab"
  data.write_digits_task(str(root), name="digits", classes=(0, 1), train_size=40)
  source = data.FolderTaskSource(str(root), "digits", "test")
  n = len(source)
  first = data.EvalIterator(source, 8, 16, mesh, resident_budget_bytes=0,
                            cache_dir=str(tmp_path / "cache"))
  labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in first])
  np.testing.assert_array_equal(labels, source.labels())

  def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although cached")

  monkeypatch.setattr(Image, "open", no_decoding)
  second = data.EvalIterator(source, 8, 16, mesh, resident_budget_bytes=0,
                             cache_dir=str(tmp_path / "cache"))
  count = sum(int(np.asarray(b["mask"]).sum()) for b in second)
  assert count == n


def test_normalize_statistics():
  x = jnp.array([[[[0, 255, 128]]]], jnp.uint8)
  np.testing.assert_allclose(np.asarray(data.normalize(x))[0, 0, 0],
                             [-1.0, 1.0, 128 / 127.5 - 1], rtol=1e-6, atol=1e-6)
  expected = (np.array([0, 255, 128]) / 255 - np.array(data.IMAGENET_MEAN)) / np.array(
      data.IMAGENET_STD)
  out = jax.jit(lambda v: data.normalize(v, "imagenet"))(x)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], expected, rtol=1e-5)
  out = data.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown normalization"):
    data.normalize(x, "cifar")


def test_random_resized_crop_is_deterministic_and_in_range():
  img = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)
  rng = lambda i: data.preprocess.augment_rng(12, 3, i)
  a = data.random_resized_crop_flip(img, 16, rng(5))
  b = data.random_resized_crop_flip(img, 16, rng(5))
  c = data.random_resized_crop_flip(img, 16, rng(6))
  assert a.shape == (16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for i in range(200):
    left, top, w, h = data.preprocess.random_resized_crop_box(60, 40, rng(i))
    assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 40
    area = w * h / 2400
    assert 0.18 <= area <= 1.0 and 0.7 <= w / h <= 1.4
  # Impossible aspect ratios fall back to a centre crop with the clamped ratio.
  assert data.preprocess.random_resized_crop_box(100, 10, rng(0), (0.99, 1.0),
                                                 (1.0, 1.0)) == (45, 0, 10, 10)
  flips = [data.random_resized_crop_flip(img, 8, rng(i), scale=(1, 1), ratio=(1.5, 1.5))
           for i in range(20)]
  plain = data.resize(img, 8)
  mirrored = plain[:, ::-1]
  kinds = [np.array_equal(f, plain) + 2 * np.array_equal(f, mirrored) for f in flips]
  assert set(kinds) == {1, 2}  # both flipped and unflipped occur, nothing else


def test_streaming_iterator_is_deterministic_and_drop_last(mesh, tmp_path):
  root = tmp_path / "train"
  for c in range(3):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(9):
      value = 20 * c + i
      Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(
          root / f"class{c}" / f"{i}.png")
  source = data.ImageFolderSource(str(root))
  stream = data.StreamingTrainIterator(source, 6, 8, mesh, seed=5, num_workers=2)
  assert stream.steps_per_epoch == 3  # 27 // 8
  epoch0 = list(stream.epoch(0))
  assert len(epoch0) == 3
  values = []
  for s, b in enumerate(epoch0):
    assert b["image"].shape == (8, 6, 6, 3) and b["image"].dtype == jnp.uint8
    assert b["image"].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 4)
    idx = stream.local_indices(0, s)
    np.testing.assert_array_equal(np.asarray(b["label"]), source.labels()[idx])
    img = np.asarray(b["image"])
    values.extend(img[:, 3, 3, 0].tolist())
    np.testing.assert_array_equal(img, stream.local_batch_arrays(0, s)["image"])
  expected = [20 * (int(p.split("/")[0][-1])) + int(p.split("/")[1][0])
              for p in np.asarray(source.paths)[stream.epoch_order(0)[:24]]]
  assert values == expected  # constant images: crops keep the value
  assert len(set(stream.epoch_order(0)[:24].tolist())) == 24
  again = list(stream.epoch(0))
  for a, b in zip(epoch0, again):
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
  resumed = list(stream.epoch(0, start_step=2))
  assert len(resumed) == 1
  np.testing.assert_array_equal(np.asarray(resumed[0]["label"]), np.asarray(epoch0[2]["label"]))
  assert not np.array_equal(stream.epoch_order(1), stream.epoch_order(0))
  gen = stream.epoch(1)
  next(gen)
  gen.close()  # stopping early shuts the prefetch thread down

  plain = data.StreamingTrainIterator(source, 6, 8, mesh, seed=5, augment=False)
  b = plain.local_batch_arrays(0, 0)
  idx = plain.local_indices(0, 0)
  np.testing.assert_array_equal(b["image"], np.stack(
      [data.resize(source.get(int(i))[0], 6) for i in idx]))


def test_streaming_iterator_surfaces_decode_errors(mesh, tmp_path):
  root = tmp_path / "train"
  (root / "a").mkdir(parents=True)
  for i in range(8):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a" / f"{i}.png")
  (root / "a" / "7.png").write_bytes(b"garbage")
  stream = data.StreamingTrainIterator(data.ImageFolderSource(str(root)), 4, 8, mesh)
  with pytest.raises(data.DataError, match="cannot read image .*7.png"):
    list(stream.epoch(0))


def test_streaming_iterator_splits_batches_over_simulated_hosts(mesh):
  source = _id_source(50)
  shares = [host_batches.StreamingTrainIterator(source, 4, 16, mesh, seed=1, process_index=p,
                                            process_count=2) for p in range(2)]
  for step in range(3):
    both = np.concatenate([s.local_indices(4, step) for s in shares])
    np.testing.assert_array_equal(both, shares[0].epoch_order(4)[16 * step:16 * (step + 1)])


@pytest.mark.parametrize("num_devices", [1, 2])
def test_gather_batch_on_smaller_meshes(num_devices):
  small = sharding.make_mesh(num_devices)
  train = data.resident_train_set(_id_source(37), 4, small)
  assert train.images.shape[0] == 37 + (-37) % num_devices
  idx = jnp.array([36, 0, 5, 17, 18, 2], jnp.int32)
  b = jax.jit(lambda t, i: data.gather_batch(t.images, t.labels, i, t.mesh))(train, idx)
  np.testing.assert_array_equal(np.asarray(b["label"]), np.asarray(idx))
  np.testing.assert_array_equal(_ids(b["image"]), np.asarray(idx))
