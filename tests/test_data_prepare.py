"""scripts/prepare_vtab.py: help and errors without TensorFlow, verify and folder export."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from idat_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "prepare_vtab.py")


@pytest.fixture(scope="module")
def prepare_vtab():
  spec = importlib.util.spec_from_file_location("prepare_vtab", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_help_works_without_tensorflow():
  out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                       timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  for text in ("--tasks", "--export_folder", "--skip_prepare", "tfds-prepare",
               "diabetic_retinopathy", "--instructions"):
    assert text in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="checks the message shown when TensorFlow is absent")
def test_prepare_without_tensorflow_says_how_to_install(prepare_vtab, capsys, tmp_path):
  assert prepare_vtab.main(["--tasks", "dtd", "--data_dir", str(tmp_path)]) == 2
  assert "pip install -e .[tfds-prepare]" in capsys.readouterr().err
  assert prepare_vtab.main(["--tasks", "dtd,imagenet"]) == 2
  assert "unknown task 'imagenet'" in capsys.readouterr().err


def test_task_selection_and_instructions(prepare_vtab, capsys, tmp_path):
  assert prepare_vtab.select_tasks("all", data) == list(data.VTAB_TASKS)
  assert prepare_vtab.select_tasks("pets,dtd,oxford_iiit_pet", data) == [
      "oxford_iiit_pet", "dtd"]
  assert prepare_vtab.select_tasks("specialized", data) == [
      "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
  assert prepare_vtab.main(["--instructions", "--data_dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  assert f"{manual}/NWPU-RESISC45/<class>/<image>.jpg" in out
  assert "kaggle.com/c/diabetic-retinopathy-detection" in out and "trainLabels.csv" in out
  assert "[dtd]" not in out


def test_verify_and_export_folder_layout(prepare_vtab, capsys, tmp_path):
  export = tmp_path / "vtab-1k"
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE,
                              mock_array_record_data_source=tfds.testing.PickableDataSourceMock()):
    report = prepare_vtab.verify_task("dtd", data, str(tmp_path))
    code = prepare_vtab.main(["--tasks", "dtd", "--skip_prepare", "--data_dir", str(tmp_path),
                              "--export_folder", str(export), "--jpeg_quality", "100"])
    tfds_test = data.TfdsTaskSource("dtd", "test", str(tmp_path))
    tfds_images = [tfds_test.get(i)[0] for i in range(5)]
    tfds_labels = tfds_test.labels()
  assert [report[s]["expected"] for s in data.SPLITS] == [800, 200, 1000, 1880]
  assert all(r["size"] == 5 and not r["ok"] for r in report.values())
  assert sum(report["test"]["histogram"].values()) == 5
  out = capsys.readouterr()
  assert code == 1  # the mock has 5 examples per split, not 800/200/1000/1880
  assert "MISMATCH (expected 800)" in out.out and "failed tasks: dtd" in out.err
  for split in data.SPLITS:
    lines = (export / "dtd" / f"{split}.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [
        f"images/{split}/{i:06d}.jpg" for i in range(5)]
  folder = data.FolderTaskSource(str(export), "dtd", "test")
  np.testing.assert_array_equal(folder.labels(), tfds_labels)
  for i in range(5):
    image, _ = folder.get(i)
    assert np.asarray(image).shape == tfds_images[i].shape  # native size, not resized
    # JPEG subsamples chroma (as NOAH's export); luma survives quality 100 almost exactly.
    luma = np.asarray(image.convert("L"), np.int32)
    want = np.asarray(Image.fromarray(tfds_images[i]).convert("L"), np.int32)
    assert np.abs(luma - want).mean() < 3
  stamp = os.stat(export / "dtd" / "test.txt").st_mtime_ns
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE,
                              mock_array_record_data_source=tfds.testing.PickableDataSourceMock()):
    assert prepare_vtab.main(["--tasks", "dtd", "--skip_prepare", "--no_verify",
                              "--data_dir", str(tmp_path), "--export_folder", str(export)]) == 0
  assert os.stat(export / "dtd" / "test.txt").st_mtime_ns == stamp  # complete: kept
