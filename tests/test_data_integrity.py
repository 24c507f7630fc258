"""Data that used to go silently wrong: 16-bit and float images, images replaced in place
under an unchanged list file, invalid task metadata and non-UTF-8 list files."""

import json
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from idat_jax import data
from idat_jax.data import preprocess


def _write_list(task_dir, names_labels):
  (task_dir / "test.txt").write_text("".join(f"{n} {l}\n" for n, l in names_labels))


def test_16bit_png_is_scaled_by_its_own_range(tmp_path):
  # A 12-bit ramp stored as 16-bit PNG (mode I;16), as medical scanners write them.
  ramp = np.linspace(100, 4000, 64 * 48).reshape(48, 64).astype(np.uint16)
  path = tmp_path / "ramp.png"
  Image.fromarray(ramp).save(path)
  assert Image.open(path).mode in preprocess.WIDE_MODES
  rgb = np.asarray(preprocess.load_image_file(path))
  assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  expected = np.rint((ramp.astype(np.float64) - 100) * 255 / 3900).astype(np.uint8)
  np.testing.assert_array_equal(rgb[..., 0], expected)
  assert rgb.min() == 0 and rgb.max() == 255
  # What PIL's plain convert('RGB') does to it: almost every pixel saturates at 255.
  assert np.mean(np.asarray(Image.open(path).convert("RGB")) == 255) > 0.9


def test_float_and_constant_images(tmp_path):
  values = np.array([[0.25, 0.5], [np.nan, 1.25]], np.float32)
  path = tmp_path / "float.tiff"
  Image.fromarray(values, mode="F").save(path)
  grey = np.asarray(preprocess.load_image_file(path))[..., 0]
  np.testing.assert_array_equal(grey, [[0, 64], [0, 255]])
  const = tmp_path / "const.png"
  Image.fromarray(np.full((3, 3), 700, np.uint16)).save(const)
  assert not np.asarray(preprocess.load_image_file(const)).any()


def test_unreadable_or_unconvertible_image_names_the_file(tmp_path, monkeypatch):
  task_dir = tmp_path / "t"
  task_dir.mkdir()
  Image.new("I;16", (4, 4)).save(task_dir / "ok.png")
  (task_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  Image.new("L", (4, 4)).save(task_dir / "odd.png")
  _write_list(task_dir, [("ok.png", 0), ("bad.png", 1), ("odd.png", 1)])
  source = data.FolderTaskSource(str(tmp_path), "t", "test", num_classes=2)
  assert np.asarray(source.get(0)[0]).shape == (4, 4, 3)
  with pytest.raises(data.DataError, match=r"test.txt:2: cannot read image .*bad.png"):
    source.get(1)
  # A mode PIL cannot turn into RGB ('La', premultiplied grey + alpha) is refused by name.
  monkeypatch.setattr(Image, "open", lambda p: Image.new("La", (4, 4)))
  with pytest.raises(data.DataError, match=r"test.txt:3: cannot read image .*odd.png: "
                                           r"ValueError: image mode 'La' cannot be converted"):
    source.get(2)


def test_replaced_image_is_decoded_again_only_that_entry(tmp_path, monkeypatch, caplog):
  task_dir = tmp_path / "t"
  task_dir.mkdir()
  names = []
  for i in range(5):
    Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)).save(task_dir / f"{i}.png")
    names.append((f"{i}.png", i % 2))
  _write_list(task_dir, names)
  cache_dir = str(tmp_path / "cache")
  source = data.FolderTaskSource(str(tmp_path), "t", "test", num_classes=2)
  first, _ = data.load_arrays(source, 6, cache_dir=cache_dir)
  assert int(first[3, 0, 0, 0]) == 30

  # Replace image 3 in place (new pixels, later mtime); the list file is untouched.
  Image.fromarray(np.full((6, 6, 3), 200, np.uint8)).save(task_dir / "3.png")
  later = time.time() + 5
  os.utime(task_dir / "3.png", (later, later))
  decoded = []
  original_get = data.FolderTaskSource.get

  def counting_get(self, index):
    decoded.append(index)
    return original_get(self, index)

  monkeypatch.setattr(data.FolderTaskSource, "get", counting_get)
  source = data.FolderTaskSource(str(tmp_path), "t", "test", num_classes=2)
  with caplog.at_level(logging.INFO):
    again, _ = data.load_arrays(source, 6, cache_dir=cache_dir)
  assert decoded == [3]
  assert int(again[3, 0, 0, 0]) == 200
  np.testing.assert_array_equal(np.asarray(again)[[0, 1, 2, 4]], first[[0, 1, 2, 4]])
  assert "1 of 5 cached images" in caplog.text
  # A third load decodes nothing; the same entry directory served all three loads.
  decoded.clear()
  third, _ = data.load_arrays(source, 6, cache_dir=cache_dir)
  assert decoded == [] and int(third[3, 0, 0, 0]) == 200
  assert len(os.listdir(os.path.dirname(data.cache_entry_dir(cache_dir, source, 6)))) == 1

  # Touching the list file (same content) keeps the cache entry.
  os.utime(task_dir / "test.txt", (later, later))
  touched = data.FolderTaskSource(str(tmp_path), "t", "test", num_classes=2)
  assert data.cache_entry_dir(cache_dir, touched, 6) == data.cache_entry_dir(cache_dir, source, 6)


@pytest.mark.slow
def test_stratified_subset_cache_key_is_stable_across_processes(tmp_path):
  import subprocess
  import sys
  task_dir = tmp_path / "t"
  task_dir.mkdir()
  for i in range(8):
    Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(task_dir / f"{i}.png")
  _write_list(task_dir, [(f"{i}.png", i % 2) for i in range(8)])
  code = ("from idat_jax import data; from idat_jax.data import loader;"
          f"s = data.FolderTaskSource({str(tmp_path)!r}, 't', 'test', num_classes=2);"
          "print(loader.stratified_split(s, 0.5, 'train', 0).fingerprint())")
  prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env=dict(os.environ, PYTHONHASHSEED=str(seed))
                           ).stdout for seed in (1, 2)}
  assert len(prints) == 1


def test_invalid_task_json_and_non_utf8_list_name_the_file(tmp_path):
  task_dir = tmp_path / "t"
  task_dir.mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(task_dir / "a.png")
  _write_list(task_dir, [("a.png", 0)])
  (task_dir / "task.json").write_text("{num_classes: 3")
  with pytest.raises(data.DataError, match=r"task.json: invalid task metadata \(JSONDecodeError"):
    data.FolderTaskSource(str(tmp_path), "t", "test")
  (task_dir / "task.json").write_text(json.dumps({"num_classes": "many"}))
  with pytest.raises(data.DataError, match=r"task.json: invalid task metadata"):
    data.FolderTaskSource(str(tmp_path), "t", "test")
  (task_dir / "task.json").write_text(json.dumps({"num_classes": 3}))
  assert data.FolderTaskSource(str(tmp_path), "t", "test").num_classes == 3
  (task_dir / "test.txt").write_bytes("caf\xe9.png 0\n".encode("latin-1"))
  with pytest.raises(data.DataError, match=r"test.txt: not UTF-8 text \(byte 3"):
    data.FolderTaskSource(str(tmp_path), "t", "test")
