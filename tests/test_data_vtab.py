"""VTAB-1K registry, label transforms and the TFDS backend (mock array_record data, no TF)."""

import contextlib
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from idat_jax import data
from idat_jax.data import vtab

# (folder name, group, classes, TFDS name, val200 slice, test split, #test): reference table.
VTAB_TABLE = [
    ("caltech101", "Natural", 102, "caltech101", "train[2754:2954]", "test", 6084),
    ("cifar", "Natural", 100, "cifar100", "train[45000:45200]", "test", 10000),
    ("dtd", "Natural", 47, "dtd", "validation[:200]", "test", 1880),
    ("oxford_flowers102", "Natural", 102, "oxford_flowers102", "validation[:200]", "test", 6149),
    ("oxford_iiit_pet", "Natural", 37, "oxford_iiit_pet", "train[2944:3144]", "test", 3669),
    ("svhn", "Natural", 10, "svhn_cropped", "train[65931:66131]", "test", 26032),
    ("sun397", "Natural", 397, "sun397/tfds", "validation[:200]", "test", 21750),
    ("patch_camelyon", "Specialized", 2, "patch_camelyon", "validation[:200]", "test", 32768),
    ("eurosat", "Specialized", 10, "eurosat/rgb", "train[16200:16400]", "train[21600:]", 5400),
    ("resisc45", "Specialized", 45, "resisc45", "train[18900:19100]", "train[25200:]", 6300),
    ("diabetic_retinopathy", "Specialized", 5, "diabetic_retinopathy_detection/btgraham-300",
     "validation[:200]", "test", 42670),
    ("clevr_count", "Structured", 8, "clevr", "train[63000:63200]", "validation", 15000),
    ("clevr_dist", "Structured", 6, "clevr", "train[63000:63200]", "validation", 15000),
    ("dmlab", "Structured", 6, "dmlab", "validation[:200]", "test", 22735),
    ("kitti", "Structured", 4, "kitti", "validation[:200]", "test", 711),
    ("dsprites_loc", "Structured", 16, "dsprites", "train[589824:590024]", "train[663552:]", 73728),
    ("dsprites_ori", "Structured", 16, "dsprites", "train[589824:590024]", "train[663552:]", 73728),
    ("smallnorb_azi", "Structured", 18, "smallnorb", "test[:200]", "test[50%:]", 12150),
    ("smallnorb_ele", "Structured", 9, "smallnorb", "test[:200]", "test[50%:]", 12150),
]


class _ConstantShapeGenerator(mocking.RandomFakeGenerator):
  """Mock examples whose variable-length features all have length 10 (10 objects per scene)."""

  def __init__(self, *args, **kwargs):
    kwargs["constant_dynamic_shape"] = True
    super().__init__(*args, **kwargs)


@contextlib.contextmanager
def mock_tfds(monkeypatch, num_examples):
  # Random per-feature lengths (5..49) would make CLEVR scenes with up to 49 objects and
  # KITTI objects with mismatched `type`/`location` lengths; real data has neither.
  monkeypatch.setattr(mocking, "RandomFakeGenerator", _ConstantShapeGenerator)
  with tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE,
      mock_array_record_data_source=tfds.testing.PickableDataSourceMock()):
    yield


def test_registry_matches_the_reference_table():
  assert data.VTAB_TASKS == tuple(row[0] for row in VTAB_TABLE)
  for name, group, classes, tfds_name, val200, test, test_size in VTAB_TABLE:
    spec = data.get_task(name)
    assert (spec.group, spec.num_classes, spec.tfds_name, spec.test_size) == (
        group, classes, tfds_name, test_size)
    assert spec.tfds_split("train800") == "train[:800]"
    assert spec.tfds_split("val200") == val200
    assert spec.tfds_split("train800val200") == f"train[:800]+{val200}"
    assert spec.tfds_split("test") == test
    assert [spec.split_size(s) for s in data.SPLITS] == [800, 200, 1000, test_size]
  assert data.get_task("dmlab").tfds_version == "2.0.1"
  assert data.get_task("kitti").tfds_versions == ("3.1.0", "3.2.0")
  assert [len(data.tasks_in_group(g)) for g in data.GROUPS] == [7, 4, 8]


def test_aliases_and_unknown_names():
  assert data.get_task("cifar100").name == "cifar"
  assert data.get_task("flowers102").name == "oxford_flowers102"
  assert data.get_task("pets").name == "oxford_iiit_pet"
  assert data.get_task("digits").num_classes == 10
  with pytest.raises(data.UnknownTaskError) as err:
    data.get_task("imagenet_vtab")
  message = str(err.value)
  assert "unknown task 'imagenet_vtab'" in message
  for name in data.VTAB_TASKS + ("digits", "cifar100", "pets", "flowers102"):
    assert name in message
  with pytest.raises(data.DataError, match="unknown VTAB split 'train1000'.*train800val200"):
    data.get_task("dtd").tfds_split("train1000")


def test_clevr_labels():
  def scene(depths):
    return {"objects": {"size": np.zeros(len(depths)),
                        "pixel_coords": np.array([[1.0, 2.0, d] for d in depths])}}

  assert vtab.clevr_count_label(scene([1] * 3)) == 0
  assert vtab.clevr_count_label(scene([1] * 10)) == 7
  # thresholds [0, 8, 8.5, 9, 9.5, 10, 100]: largest i with thresholds[i] < min depth.
  assert vtab.clevr_distance_label(scene([12.0, 8.7, 9.2])) == 2
  assert vtab.clevr_distance_label(scene([8.0, 30.0])) == 0
  assert vtab.clevr_distance_label(scene([8.0001])) == 1
  assert vtab.clevr_distance_label(scene([9.5, 11.0])) == 3
  assert vtab.clevr_distance_label(scene([9.75])) == 4
  assert vtab.clevr_distance_label(scene([50.0, 60.0])) == 5
  with pytest.raises(ValueError):
    vtab.clevr_distance_label(scene([-1.0]))


def test_kitti_labels():
  def frame(types, depths):
    return {"objects": {"type": np.array(types),
                        "location": np.array([[0.0, 1.0, d] for d in depths])}}

  # types: 0 Car, 1 Van, 2 Truck are vehicles; 3 Pedestrian, 4 Person_sitting, 5 Cyclist not.
  assert vtab.kitti_distance_label(frame([3, 0], [2.0, 15.0])) == 1
  assert vtab.kitti_distance_label(frame([0, 2], [30.0, 7.9])) == 0
  assert vtab.kitti_distance_label(frame([1], [8.0])) == 0  # 8 < 8 is false
  assert vtab.kitti_distance_label(frame([1], [20.0])) == 1
  assert vtab.kitti_distance_label(frame([0, 5], [25.0, 1.0])) == 2
  assert vtab.kitti_distance_label(frame([3, 4, 5], [1.0, 2.0, 3.0])) == 3  # no vehicle
  assert vtab.kitti_distance_label(frame([], [])) == 3


def test_dsprites_and_smallnorb_labels_and_images():
  loc = data.get_task("dsprites_loc").label_fn
  ori = data.get_task("dsprites_ori").label_fn
  assert [loc({"label_x_position": np.int64(x)}) for x in (0, 1, 2, 5, 30, 31)] == [
      0, 0, 1, 2, 15, 15]
  oris = [ori({"label_orientation": np.int64(o)}) for o in range(40)]
  assert oris[:8] == [0, 0, 0, 1, 1, 2, 2, 2]  # floor(o / 2.5)
  assert oris[-3:] == [14, 15, 15]
  assert np.bincount(oris).tolist() == [3, 2] * 8
  assert data.get_task("smallnorb_azi").label_fn({"label_azimuth": np.int64(17)}) == 17
  assert data.get_task("smallnorb_ele").label_fn({"label_elevation": np.int64(8)}) == 8

  bits = np.array([[[0], [1]], [[1], [0]]], np.uint8)
  image = data.get_task("dsprites_loc").image_fn({"image": bits})
  assert image.shape == (2, 2, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 2], [[0, 255], [255, 0]])
  grey = np.array([[[7], [200]]], np.uint8)
  np.testing.assert_array_equal(data.get_task("smallnorb_azi").image_fn({"image": grey}),
                                [[[7, 7, 7], [200, 200, 200]]])


def test_all_19_tasks_through_the_tfds_backend(monkeypatch, tmp_path):
  size, num_examples = 16, 5
  with mock_tfds(monkeypatch, num_examples):
    for name, _, classes, *_ in VTAB_TABLE:
      for split in data.SPLITS:
        source = data.open_task_split(name, split, backend="tfds", data_dir=str(tmp_path))
        assert isinstance(source, data.TfdsTaskSource)
        assert len(source) == num_examples, (name, split)
        assert source.num_classes == classes
        images, labels = data.load_arrays(source, size, num_workers=1)
        assert images.shape == (num_examples, size, size, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        assert labels.min() >= 0 and labels.max() < classes, (name, split, labels)
        np.testing.assert_array_equal(source.labels(), labels)
        if name == "clevr_count":  # the constant-shape mock puts 10 objects in every scene
          assert labels.tolist() == [7] * num_examples
        if name == "kitti":
          assert set(labels.tolist()) <= {0, 3}  # depths in [0, 1) or no vehicle
      assert source.version  # resolved TFDS version is recorded


def test_tfds_pets_falls_back_to_the_version_this_tfds_builds(monkeypatch, tmp_path):
  with mock_tfds(monkeypatch, 2):
    source = data.TfdsTaskSource("pets", "test", str(tmp_path))
  assert source.version.startswith("4.")


def test_missing_tfds_data_dir_names_dir_and_command(tmp_path):
  missing = tmp_path / "no_tfds_here"
  with pytest.raises(data.DataNotPreparedError) as err:
    data.TfdsTaskSource("kitti", "test", str(missing))
  message = str(err.value)
  assert str(missing) in message
  assert "python scripts/prepare_vtab.py --tasks kitti" in message
  with pytest.raises(data.DataNotPreparedError, match="manual download.*NWPU-RESISC45"):
    data.TfdsTaskSource("resisc45", "train800", str(missing))


@pytest.mark.skipif(data.tfds_backend.tensorflow_available(),
                    reason="checks the message shown when TensorFlow is absent")
def test_tfrecord_data_without_tensorflow_is_explained(tmp_path):
  version_dir = tmp_path / "dtd" / "3.0.1"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(
      json.dumps({"name": "dtd", "version": "3.0.1", "fileFormat": "tfrecord"}))
  with pytest.raises(data.DataError, match="tfrecord.*TensorFlow.*--file_format array_record"):
    data.TfdsTaskSource("dtd", "test", str(tmp_path))


def test_folder_only_task_has_no_tfds_source(tmp_path):
  with pytest.raises(data.DataError, match="no TFDS source"):
    data.TfdsTaskSource("digits", "test", str(tmp_path))
  with pytest.raises(data.DataError, match="unknown backend"):
    data.open_task_split("dtd", backend="hdf5", data_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []


def _build_tiny_array_record(data_dir: str) -> None:
  """A real (not mocked) array_record data set written without TensorFlow."""
  import io
  from PIL import Image

  pkg_dir = os.path.join(data_dir, "..", "pkg")
  os.makedirs(pkg_dir, exist_ok=True)
  with tfds.core.registered.skip_registration():

    class IdatTestTiny(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      pkg_dir_path = tfds.core.Path(pkg_dir)  # empty: tests are not a package with metadata

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=5)}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 41)}

      def _generate_examples(self, start, stop):
        for i in range(start, stop):
          buf = io.BytesIO()
          Image.fromarray(np.full((3 + i % 4, 5, 3), i, np.uint8)).save(buf, format="PNG")
          yield i, {"image": buf.getvalue(), "label": i % 5}

    IdatTestTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_real_array_record_data_without_tensorflow(tmp_path):
  data_dir = str(tmp_path / "tfds")
  _build_tiny_array_record(data_dir)
  assert data.tfds_backend.prepared_versions("idat_test_tiny", data_dir) == {
      "1.0.0": "array_record"}
  full = data.TfdsImageSource("idat_test_tiny", "train", data_dir)
  assert (len(full), full.num_classes, full.version) == (30, 5, "1.0.0")
  ids = []
  for i in range(len(full)):
    image, label = full.get(i)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and (image == image[0, 0, 0]).all()
    ids.append(int(image[0, 0, 0]))
    assert label == ids[-1] % 5 and image.shape[0] == 3 + ids[-1] % 4
  assert sorted(ids) == list(range(30))
  # Label scans skip image decoding on real data (the image stays PNG bytes).
  raw = data.tfds_backend._WithoutImages(full._ds)[0]
  assert isinstance(raw["image"], bytes) and raw["image"][:4] == b"\x89PNG"
  np.testing.assert_array_equal(full.labels(), np.asarray(ids) % 5)
  few = data.TfdsImageSource("idat_test_tiny:1.0.0", "train", data_dir, fraction=0.4)
  assert np.bincount(few.labels()).tolist() == [2] * 5  # int(6 * 0.4) per class
  assert set(few.indices.tolist()) < set(range(30))
  combined, _ = data.tfds_backend.open_data_source(
      "idat_test_tiny", ("1.0.0",), "train[:4]+test[2:5]", data_dir)
  assert len(combined) == 7
  with pytest.raises(data.DataNotPreparedError, match="idat_test_tiny"):
    data.TfdsImageSource("idat_test_tiny", "train", str(tmp_path / "elsewhere"))


def test_prepared_version_unknown_to_this_tfds_is_read_from_its_directory(tmp_path,
                                                                          monkeypatch):
  data_dir = str(tmp_path / "tfds")
  _build_tiny_array_record(data_dir)

  def code_cannot_load(*args, **kwargs):
    raise AssertionError("Dataset cannot be loaded at version 1.*.*, only: 2.0.0")

  monkeypatch.setattr(tfds, "data_source", code_cannot_load)
  ds, version = data.tfds_backend.open_data_source("idat_test_tiny", ("1.*.*",), "test",
                                                   data_dir)
  assert (len(ds), version) == (11, "1.0.0")
  assert sorted(int(ds[i]["image"][0, 0, 0]) for i in range(11)) == list(range(30, 41))
  with pytest.raises(data.DataError, match="tried versions 2.*.*.*only: 2.0.0"):
    data.tfds_backend.open_data_source("idat_test_tiny", ("2.*.*",), "test", data_dir)
