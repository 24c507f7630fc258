"""Misconfigurations found during set-up and errors of the machine (disk, permissions, a work
dir that is a file) end the CLI with one ``error:`` line and exit 1, never a traceback
(issue 19)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}


def _cli(workdir, *overrides, arg=""):
  args = ["--config", os.path.join(REPO, "configs", "idat_vtab.py")
          + ":task=dtd,backend=synthetic,ckpt_dir=none,dtype=float32" + arg,
          "--workdir", str(workdir), "--config.data.image_size=16", "--config.num_devices=1",
          "--config.progress_bar=False", "--config.optim.epochs=1",
          "--config.optim.cooldown_epochs=0", "--config.optim.warmup_epochs=0"]
  for model in ("student", "teacher"):
    args.append(f"--config.models.{model}.variant=custom")
    args += [f"--config.models.{model}.{k}={v}" for k, v in TINY.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "idat_jax.main", *args, *overrides], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(out) -> str:
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0]


@pytest.mark.slow
def test_setup_misconfigurations_and_a_file_as_work_dir_are_one_line(tmp_path):
  line = _one_error_line(_cli(tmp_path / "big", "--config.batch_size=4096"))
  assert "config.batch_size=4096 exceeds the 1000 training examples of 'dtd'" in line
  line = _one_error_line(_cli(tmp_path / "accum", "--config.batch_size=500",
                              "--config.optim.accum_steps=3"))
  assert "config.optim.accum_steps=3: an epoch has only 2 micro-batches" in line
  line = _one_error_line(_cli(tmp_path / "opt", "--config.optim.name=sgd"))
  assert line == "error: config.optim.name='sgd': expected one of ('adamw', 'lars')"
  (tmp_path / "afile").write_text("not a folder")
  line = _one_error_line(_cli(tmp_path / "afile"))
  assert str(tmp_path / "afile") in line and "choose another --workdir" in line


def test_linear_probe_refuses_a_batch_of_one():
  from idat_jax.errors import ConfigError
  from idat_jax.methods import build_method
  from repo_files import load_file
  config = load_file("configs/wecolora_linprobe.py", "linprobe_cfg_batch").get_config(
      "dataset=imagenet,r=1")
  config.batch_size = 1
  with pytest.raises(ConfigError, match=r"config.batch_size=1: the linear probe's BatchNorm "
                     r"needs a batch of at least 2"):
    build_method(config)


def test_environment_messages_name_the_file_and_what_to_do():
  import errno
  from idat_jax.main import environment_message
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
  assert environment_message(full) == (
      "No space left on device: /runs/x/metrics.jsonl (free space and run the same command "
      "again (a training run resumes from its last complete checkpoint))")
  ro = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
  assert "read-only: choose another --workdir" in environment_message(ro)
  assert environment_message(OSError("boom"), "/w") == "boom: /w"


def _gcs_client_installed() -> bool:
  import importlib.util
  return any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow"))


def _read_only_tmpfs(target) -> bool:
  """Mounts a read-only tmpfs at ``target`` (root in a sandbox that allows it)."""
  import shutil
  os.makedirs(target, exist_ok=True)
  return (os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)],
      capture_output=True).returncode == 0)


def _can_mount() -> bool:
  probe = "/tmp/idat_ro_probe"
  ok = _read_only_tmpfs(probe)
  if ok:
    subprocess.run(["umount", "-l", probe], capture_output=True)
  return ok


@pytest.mark.slow
@pytest.mark.skipif(_gcs_client_installed(), reason="a GCS client library is installed")
def test_gs_workdir_without_a_client_is_one_line():
  line = _one_error_line(_cli("gs://bucket/runs/dtd"))
  assert "gs://bucket/runs/dtd" in line and "pip install gcsfs" in line


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs permission to mount a read-only tmpfs")
def test_read_only_workdir_is_one_line(tmp_path):
  ro = tmp_path / "ro"
  assert _read_only_tmpfs(ro)
  try:
    line = _one_error_line(_cli(ro / "run"))
    assert "Read-only file system" in line and str(ro / "run") in line
    assert "choose another --workdir" in line
  finally:
    subprocess.run(["umount", "-l", str(ro)], capture_output=True)
