"""gs:// work dirs: every file of a run lands in the bucket, none in a local folder named 'gs:'.

Cloud TPU runs keep their work dir on GCS (README, 'Multi-host'). Orbax writes the checkpoints
there itself; these tests cover everything else the project writes and reads (config records,
metrics, results, summaries, exports, pretrained files), through ``etils.epath`` as in
production, on an in-memory object store registered as fsspec's ``gs`` filesystem. Like GCS, it
refuses appends. Orbax's own GCS path (tensorstore) cannot be reached here: the end-to-end run
keeps its checkpoints on local disk and everything else in the fake bucket.
"""

import csv
import io
import json
import os
import sys

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from idat_jax import checkpoints as ck
from idat_jax import config_lib, demo, fileio, train
from idat_jax.errors import ConfigError, StorageError
from idat_jax.training import metrics as metrics_lib
from idat_jax.training import workdir as wd
from idat_jax.training.checkpointing import Checkpointer


class FakeGCS(MemoryFileSystem):
  """An in-memory bucket standing in for gcsfs: whole-object writes only, as on GCS."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close  # what etils passes to gcsfs
    super().__init__(*args, **kwargs)

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("GCS objects cannot be appended to")
    return super()._open(path, mode, **kwargs)


def _epath_backend():
  from etils.epath import backend
  return backend.fsspec_backend


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """Routes gs:// through FakeGCS (etils' fsspec backend, as without TensorFlow); HOME is a
  temp dir so host caches (~/.cache/idat_jax) stay inside the test."""
  from etils.epath import gpath
  registry = sys.modules["fsspec.registry"]._registry
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, FakeGCS)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(FakeGCS, "store", {})
  monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  FakeGCS.clear_instance_cache()
  _epath_backend()._get_filesystem.cache_clear()
  yield FakeGCS.store
  FakeGCS.clear_instance_cache()
  _epath_backend()._get_filesystem.cache_clear()


def _objects(store, prefix="gs://bucket/"):
  return sorted(k[len(prefix):] for k in store if k.startswith(prefix))


def test_fileio_round_trips_on_a_bucket(bucket, tmp_path):
  path = "gs://bucket/run/notes.txt"
  fileio.write_text(path, "line one\r\nline two\n")
  assert fileio.exists(path) and fileio.isfile(path) and fileio.isdir("gs://bucket/run")
  assert fileio.read_text(path) == "line one\nline two\n"  # universal newlines, as open()
  assert fileio.read_text(path, newline="") == "line one\r\nline two\n"
  assert fileio.abspath(path) == path
  with pytest.raises(ValueError, match="not supported on remote storage"):
    fileio.open_file(path, "a")
  with pytest.raises(ValueError, match="not supported on remote storage"):
    fileio.open_file(path, "w")
  # A failed block uploads nothing; a clean one uploads the whole tree.
  with pytest.raises(RuntimeError):
    with fileio.atomic_write("gs://bucket/run/export", directory=True) as tmp:
      open(os.path.join(tmp, "a.bin"), "wb").close()
      raise RuntimeError("interrupted")
  assert not fileio.exists("gs://bucket/run/export/a.bin")
  with fileio.atomic_write("gs://bucket/run/export", directory=True) as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    with open(os.path.join(tmp, "sub", "b.bin"), "wb") as f:
      f.write(b"\x00\x01")
  with fileio.open_file("gs://bucket/run/export/sub/b.bin", "rb") as f:
    assert f.read() == b"\x00\x01"
  # Nothing was written to a local folder named after the scheme.
  assert not os.path.exists(tmp_path / "gs:")


def test_local_copy_downloads_once_per_size(bucket):
  path = "gs://bucket/ckpt/weights.bin"
  with fileio.open_file(path, "wb") as f:
    f.write(b"12345")
  local = fileio.local_copy(path)
  assert local.startswith(fileio.host_cache_dir("remote")) and open(local, "rb").read() == b"12345"
  with open(local, "wb") as f:  # same size: the host's copy is reused (no download)
    f.write(b"abcde")
  assert open(fileio.local_copy(path), "rb").read() == b"abcde"
  with fileio.open_file(path, "wb") as f:  # the remote file changed size: downloaded again
    f.write(b"123456")
  assert open(fileio.local_copy(path), "rb").read() == b"123456"
  assert fileio.local_copy("relative/file.npz") == "relative/file.npz"


def test_pretrained_npz_is_read_from_a_bucket(bucket, tmp_path):
  rng = np.random.default_rng(0)
  params = {"embedding": {"kernel": rng.normal(size=(4, 4, 3, 8)).astype(np.float32),
                          "bias": rng.normal(size=(8,)).astype(np.float32)}}
  ck.save_npz(params, "gs://bucket/ckpt/tiny.npz")  # atomic_write uploads the local temp file
  assert _objects(bucket) == ["ckpt/tiny.npz"]
  loaded = ck.load_params("gs://bucket/ckpt/tiny.npz")
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], params["embedding"]["kernel"])
  with pytest.raises(FileNotFoundError, match="gs://bucket/ckpt/missing.npz"):
    ck.load_params("gs://bucket/ckpt/missing.npz")


def test_config_records_metrics_and_results_on_a_bucket(bucket):
  workdir = "gs://bucket/runs/dtd"
  config = config_lib.base_config()
  assert wd.write_config_record(config, workdir, fresh=True) == workdir + "/config.json"
  second = wd.write_config_record(config, workdir, fresh=True)  # config.json is kept
  assert second.startswith(workdir + "/config.train.") and fileio.exists(second)
  assert json.loads(fileio.read_text(workdir + "/config.json"))["optim"]["lr"] == config.optim.lr

  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  for step in (5, 10, 15):
    writer.write(step, {"loss": np.float32(step / 100)})
  writer.sync()  # what the trainer does before each checkpoint
  rows = fileio.read_text(workdir + "/metrics.jsonl").splitlines()
  assert [json.loads(r)["step"] for r in rows] == [5, 10, 15]
  writer.write(20, {"loss": 0.04})
  writer.close()
  # A resume from step 10 drops the rows logged after it (they are logged again).
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False, resume_step=10)
  writer.write(15, {"loss": 0.5})
  writer.close()
  rows = [json.loads(r) for r in fileio.read_text(workdir + "/metrics.jsonl").splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(5, np.float32(0.05)), (10, np.float32(0.1)),
                                                     (15, 0.5)]

  results = workdir + "/results.csv"
  for seed in (0, 1):
    metrics_lib.append_result(results, {"task": "dtd", "seed": seed, "best": 70.0 + seed})
  with fileio.open_file(results, newline="", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [(r["seed"], r["best"]) for r in table] == [("0", "70.0"), ("1", "71.0")]


def test_append_result_keeps_the_existing_rows_byte_for_byte(tmp_path):
  path = str(tmp_path / "results.csv")
  metrics_lib.append_result(path, {"task": "dtd", "seed": 0, "best": 70.0})
  first = open(path, "rb").read()
  metrics_lib.append_result(path, {"task": "dtd", "seed": 1, "best": 71.0})
  both = open(path, "rb").read()
  assert both.startswith(first) and both.count(b"\r\n") == 3
  assert [r["seed"] for r in csv.DictReader(io.StringIO(both.decode()))] == ["0", "1"]


def test_remote_tensorboard_without_its_client_is_one_clear_error(bucket, monkeypatch):
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # not installed
  with pytest.raises(Exception, match="google-cloud-storage.*tensorboard=False"):
    metrics_lib.MetricWriter("gs://bucket/runs/x", tensorboard=True)


def _gcs_client_installed() -> bool:
  import importlib.util
  return any(importlib.util.find_spec(m) is not None for m in ("gcsfs", "tensorflow"))


@pytest.mark.skipif(_gcs_client_installed(), reason="a GCS client library is installed")
def test_missing_gcs_client_is_one_line_naming_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  _epath_backend()._get_filesystem.cache_clear()
  with pytest.raises(StorageError, match=r"gs://bucket/B_16.npz: .*pip install gcsfs"):
    ck.load_params("gs://bucket/B_16.npz")


@pytest.mark.parametrize("override,key", [
    ({"cache_dir": "gs://bucket/cache"}, "data.cache_dir"),
    ({"root": "gs://bucket/vtab", "backend": "folder"}, "data.root"),
])
def test_remote_data_that_needs_local_disk_is_refused(override, key):
  config = config_lib.base_config()
  config.data.update(override)
  with pytest.raises(ConfigError, match=key):
    config_lib.validate(config)
  config.data.backend, config.data.root = "tfds", ""
  config.data.tfds_data_dir = "gs://bucket/tensorflow_datasets"
  config.data.cache_dir = ""
  config_lib.validate(config)  # TFDS reads gs:// itself


@pytest.mark.slow
def test_training_run_with_a_gs_workdir_writes_everything_to_the_bucket(bucket, tmp_path,
                                                                        monkeypatch):
  local_checkpoints = tmp_path / "orbax"

  class LocalCheckpointer(Checkpointer):
    """Orbax's GCS path is tensorstore's, not reachable here: checkpoints stay local."""

    def __init__(self, directory, **kwargs):
      super().__init__(str(local_checkpoints / directory.split("://", 1)[1]), **kwargs)

  monkeypatch.setattr(train, "Checkpointer", LocalCheckpointer)
  data_root = str(tmp_path / "data")
  demo.prepare_data(data_root, 0)
  config = demo.demo_config("pretrain_small", data_root, seed=0, epochs=2)
  config.update(num_devices=1, progress_bar=False, log_every_steps=5, tensorboard=False,
                eval_every_epochs=1)
  config.optim.warmup_epochs = 1
  workdir = "gs://bucket/sweep/digits"

  config.stop_after_steps = 10  # interrupted mid-epoch, then resumed
  first = train.train_and_evaluate(config, workdir)
  assert not first["finished"]
  config.stop_after_steps = 0
  summary = train.train_and_evaluate(config, workdir)
  assert summary["finished"] and summary["workdir"] == workdir

  objects = _objects(bucket, "gs://bucket/sweep/digits/")
  assert {"config.json", "metrics.jsonl", "results.csv", "summary.json"} <= set(objects), objects
  assert any(o.startswith("config.train.") for o in objects)  # the resume's own record
  steps = [json.loads(r)["step"] for r in fileio.read_text(workdir + "/metrics.jsonl").splitlines()
           if "loss" in json.loads(r)]
  assert steps == sorted(set(steps)) and steps[-1] == summary["step"], steps
  assert json.loads(fileio.read_text(workdir + "/summary.json"))["best"] == summary["best"]
  # Caches went to this host's cache dir; nothing to a local folder named 'gs:'.
  assert not os.path.exists(tmp_path / "gs:")
  assert os.path.isdir(fileio.host_cache_dir("cache"))

  again = train.train_and_evaluate(config, workdir)  # finished: the stored summary, no new row
  assert again.get("already_finished") and again["best"] == summary["best"]
  with fileio.open_file(workdir + "/results.csv", newline="", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 1
