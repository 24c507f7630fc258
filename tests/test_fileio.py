"""idat_jax.fileio.atomic_write: all-or-nothing files and directories, and the concurrent case."""

import os
import stat

import numpy as np
import pytest

from idat_jax import fileio
from idat_jax.fileio import atomic_write


def test_file_appears_complete_or_not_at_all(tmp_path):
  path = tmp_path / "sub" / "w.npz"
  with atomic_write(path) as tmp:
    assert os.path.dirname(tmp) == str(path.parent) and tmp.endswith(".npz")
    assert not path.exists()  # nothing at the final name while writing
    np.savez(tmp, a=np.arange(3))  # the suffix is kept, so savez appends nothing
  with np.load(path) as f:
    np.testing.assert_array_equal(f["a"], [0, 1, 2])
  assert os.listdir(path.parent) == ["w.npz"]

  with pytest.raises(RuntimeError, match="disk full"):
    with atomic_write(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise RuntimeError("disk full")
  with np.load(path) as f:  # the old version is untouched and no temporary file is left
    np.testing.assert_array_equal(f["a"], [0, 1, 2])
  assert os.listdir(path.parent) == ["w.npz"]


def test_directory_replaces_the_old_one_and_cleans_up_on_error(tmp_path):
  target = tmp_path / "task"
  target.mkdir()
  (target / "stale.txt").write_text("old")
  with atomic_write(target, directory=True) as tmp:
    assert os.path.isdir(tmp) and not os.listdir(tmp)
    with open(os.path.join(tmp, "new.txt"), "w") as f:
      f.write("new")
  assert os.listdir(target) == ["new.txt"]
  with pytest.raises(KeyError):
    with atomic_write(target, directory=True) as tmp:
      with open(os.path.join(tmp, "partial.txt"), "w") as f:
        f.write("x")
      raise KeyError("interrupted")
  assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["task"]


@pytest.mark.parametrize("accept", [True, False])
def test_concurrent_writer_that_finished_first(tmp_path, monkeypatch, accept):
  """Another process creates the directory between our removal and our rename."""
  target = tmp_path / "entry"
  real_rename = os.rename

  def racing_rename(src, dst):
    os.makedirs(dst)
    with open(os.path.join(dst, "theirs.txt"), "w") as f:
      f.write("theirs")
    return real_rename(src, dst)  # fails: dst exists and is not empty

  monkeypatch.setattr(fileio.os, "rename", racing_rename)
  seen = []

  def accept_existing(path):
    seen.append(sorted(os.listdir(path)))
    return accept

  def write():
    with atomic_write(target, directory=True, accept_existing=accept_existing) as tmp:
      with open(os.path.join(tmp, "ours.txt"), "w") as f:
        f.write("ours")

  if accept:
    write()
  else:
    with pytest.raises(OSError):
      write()
  assert seen == [["theirs.txt"]]
  assert os.listdir(target) == ["theirs.txt"] and os.listdir(tmp_path) == ["entry"]


def test_written_file_has_the_umask_mode_not_mkstemps_private_one(tmp_path):
  old = os.umask(0o022)
  try:
    with atomic_write(tmp_path / "out.txt") as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        f.write("x")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "out.txt").st_mode) == 0o644
