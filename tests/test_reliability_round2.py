"""Reliability, round two (issue 19): no silent wrong result or orphan process.

Probe / folder class maps, the multi-label CSV readers, the launcher's signals, the checkpoint
left corrupt after a fallback, the NaN message without a checkpoint, symlink loops and files
that are not UTF-8. Each case failed before its fix.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idat_jax.data.base import DataError
from idat_jax.training import checkpointing
from idat_jax.training.checkpointing import Checkpointer, abstract_like
from test_run_safety import _corrupt_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Item 6: a step that failed to restore is moved aside, so the retrained step is saved.


def _state(step):
  return {"step": jnp.asarray(step, jnp.int32),
          "w": jnp.full((64, 64), float(step), jnp.float32)}


def _restores(directory, step):
  ckpt = Checkpointer(directory, create=False)
  try:
    state, meta = ckpt.restore(step, abstract_like(_state(0), jax.sharding.SingleDeviceSharding(
        jax.devices()[0])))
    return int(state["step"]) == step and meta["step"] == step
  finally:
    ckpt.close()


def test_fallback_moves_the_corrupt_step_aside_and_its_retrained_step_is_saved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, max_to_keep=3)
  for step in (4, 8):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.close()
  _corrupt_state(str(tmp_path), 8)  # (test_run_safety: <workdir>/checkpoints/<step>)

  ckpt = Checkpointer(directory, max_to_keep=3)
  target = abstract_like(_state(0), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  state, _ = ckpt.restore(None, target)
  assert int(state["step"]) == 4 and ckpt.failed_steps == [8]
  moved = ckpt.move_aside(ckpt.failed_steps)
  assert ckpt.all_steps() == [4] and ckpt.failed_steps == []
  assert len(moved) == 1
  assert os.path.basename(moved[0]).startswith(f"{checkpointing.CORRUPT_PREFIX}8-")
  assert os.path.isdir(moved[0])  # kept for inspection
  ckpt.save(8, _state(8), {"step": 8})  # without the move, Orbax skips this save silently
  ckpt.save(12, _state(12), {"step": 12})
  ckpt.close()

  reopened = Checkpointer(directory, create=False)
  try:
    assert reopened.all_steps() == [4, 8, 12]  # Orbax ignores corrupt-8-<time>
  finally:
    reopened.close()
  assert all(_restores(directory, step) for step in (4, 8, 12))


# ---------------------------------------------------------------------------------------------
# Item 1: one class-to-index map per run, the training split's.


def _image(path, value=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _probe_config(root):
  from repo_files import load_file
  return load_file("configs/wecolora_linprobe.py").get_config(f"dataset=imagenet,root={root}")


def test_probe_eval_folder_is_numbered_by_the_train_classes(tmp_path):
  from idat_jax.data import inputs
  root = tmp_path / "imagenet"
  for c in ("apple", "banana", "cherry"):
    _image(str(root / "train" / c / "0.png"))
  for c in ("apple", "cherry"):  # val lacks banana: cherry stays class 2, not 1
    _image(str(root / "val" / c / "0.png"))
  config = _probe_config(str(root))
  train = inputs.build_source(config, "train")
  val = inputs.build_source(config, "val")
  assert train.classes == val.classes == ["apple", "banana", "cherry"]
  assert list(val.labels()) == [0, 2] and val.num_classes == 3
  # The decode cache keys on the class map where it is not the folder's own.
  assert ":classes=" in val.fingerprint() and ":classes=" not in train.fingerprint()


def test_eval_class_unknown_to_training_is_an_error_naming_class_and_folder(tmp_path):
  from idat_jax.data import inputs
  root = tmp_path / "imagenet"
  for c in ("apple", "cherry"):
    _image(str(root / "train" / c / "0.png"))
  for c in ("apple", "banana", "cherry"):  # before: banana became 1, cherry 2; rc 0
    _image(str(root / "val" / c / "0.png"))
  config = _probe_config(str(root))
  with pytest.raises(DataError, match=rf"{root / 'val'}: class 'banana' is not a class of "
                                      "the training split"):
    inputs.build_source(config, "val")


def test_folder_task_eval_label_the_train_split_lacks_is_an_error(tmp_path):
  from idat_jax.data import loader
  task = tmp_path / "my_task"
  for i in range(3):
    _image(str(task / "images" / f"{i}.png"))
  (task / "train800val200.txt").write_text("images/0.png 0\nimages/1.png 1\n")
  (task / "test.txt").write_text("images/0.png 0\nimages/2.png 2\n")
  with pytest.raises(DataError, match=rf"test\.txt:2: class 2 does not occur in the training "
                                      rf"split train800val200\.txt of {task}"):
    loader.open_task_split("my_task", "test", backend="folder", data_dir=str(tmp_path),
                           train_split="train800val200")
  train = loader.open_task_split("my_task", "train800val200", backend="folder",
                                 data_dir=str(tmp_path), train_split="train800val200")
  assert train.num_classes == 2
  # Declared classes are the explicit map: an eval class without training examples is allowed.
  (task / "task.json").write_text('{"num_classes": 3}')
  test = loader.open_task_split("my_task", "test", backend="folder", data_dir=str(tmp_path),
                                train_split="train800val200")
  assert list(test.labels()) == [0, 2] and test.num_classes == 3


# ---------------------------------------------------------------------------------------------
# Item 4 and the NIH reader: duplicate rows, Excel's byte-order mark, bytes that are not UTF-8.


def test_csv_duplicate_image_with_other_labels_is_an_error_exact_duplicate_skipped(tmp_path,
                                                                                  caplog):
  from test_chestxray import _write_csv_set
  from idat_jax.data.multilabel_csv import MultiLabelCsvSource
  root = str(tmp_path / "conflict")
  _write_csv_set(root, [("img/a.png", 1, 0, 0), ("img/b.png", 0, 1, 0), ("img/a.png", 0, 0, 1)])
  with pytest.raises(DataError, match=r"train\.csv: image img/a\.png has conflicting labels on "
                                      r"lines 2 and 4"):
    MultiLabelCsvSource(root, "train")
  root = str(tmp_path / "same")
  _write_csv_set(root, [("img/a.png", 1, 0, 0), ("img/b.png", 0, 1, 0), ("img/a.png", 1, 0, 0)])
  src = MultiLabelCsvSource(root, "train")
  assert len(src) == 2 and src.skipped == {"missing_image": 0, "duplicate_row": 1}
  assert "1 row(s) repeat an earlier row" in caplog.text


def test_nih_reader_accepts_excel_bom_and_skips_exact_duplicate_rows(tmp_path):
  from test_chestxray import write_nih
  from idat_jax.data.chestxray import ChestXray14Source
  root = str(tmp_path / "nih")
  write_nih(root, ["Effusion", "Mass"], ["Edema"])
  path = os.path.join(root, "Data_Entry_2017_v2020.csv")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  first_row = text.splitlines()[1]
  with open(path, "w", encoding="utf-8-sig", newline="") as f:  # what Excel writes
    f.write(text + first_row + "\r\n")  # the first image again, same labels
  assert len(ChestXray14Source(root, "train")) == 2
  with open(path, "w", encoding="utf-8-sig", newline="") as f:
    f.write(text + first_row.replace("Effusion", "Mass") + "\r\n")
  with pytest.raises(DataError, match=r"image 00000000_000\.png has conflicting rows on lines "
                                      r"2 \('Effusion'\) and 5 \('Mass'\)"):
    ChestXray14Source(root, "train")


@pytest.mark.parametrize("kind", ["list", "csv", "nih_list", "nih_csv"])
def test_file_that_is_not_utf8_names_file_and_line(tmp_path, kind):
  from idat_jax.data import loader
  bad = b"caf\xe9.png"
  if kind == "list":
    task = tmp_path / "my_task"
    (task).mkdir()
    path = task / "train800val200.txt"
    path.write_bytes(b"a.png 0\nb.png 1\n" + bad + b" 0\n")
    open_it = lambda: loader.open_task_split("my_task", backend="folder",
                                             data_dir=str(tmp_path))
  elif kind == "csv":
    path = tmp_path / "train.csv"
    path.write_bytes(b"path,a\nx.png,1\n" + bad + b",0\n")
    open_it = lambda: loader.open_task_split("t", "train", backend="multilabel_csv",
                                             data_dir=str(tmp_path))
  else:
    from test_chestxray import write_nih
    write_nih(str(tmp_path), ["Effusion", "Mass"], ["Edema"])
    path = tmp_path / ("train_val_list.txt" if kind == "nih_list"
                       else "Data_Entry_2017_v2020.csv")
    with open(path, "rb") as f:
      lines = f.read().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + bad + lines[2][len(bad):] if len(lines) > 2
                     else lines[0] + bad + b"\n")
    open_it = lambda: loader.open_task_split("t", "train", backend="chestxray",
                                             data_dir=str(tmp_path))
  with pytest.raises(DataError, match=rf"{path}: not UTF-8 text \(byte \d+, line [23]"):
    open_it()


# ---------------------------------------------------------------------------------------------
# Symbolic link loops in data folders: skipped and counted, never an endless walk.


def _with_alarm(fn, seconds=20):
  def timeout(signum, frame):
    raise TimeoutError(f"still walking after {seconds} s: a symlink loop is followed forever")
  old = signal.signal(signal.SIGALRM, timeout)
  signal.alarm(seconds)
  try:
    return fn()
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_symlink_loops_in_an_image_folder_are_skipped_and_counted(tmp_path, caplog):
  from idat_jax.data.image_folder import ImageFolderSource
  root = tmp_path / "folder"
  _image(str(root / "cat" / "a.png"))
  _image(str(root / "cat" / "sub" / "b.png"))
  _image(str(root / "dog" / "c.png"))
  os.symlink("..", root / "cat" / "sub" / "up")  # sub/up -> cat: a loop
  os.symlink("self", root / "dog" / "self")  # a link to itself (ELOOP)
  src = _with_alarm(lambda: ImageFolderSource(str(root)))
  assert sorted(src.paths) == ["cat/a.png", "cat/sub/b.png", "dog/c.png"]
  assert "skipped 1 symbolic link(s) that loop" in caplog.text
  assert str(root / "cat" / "sub" / "up") in caplog.text


def test_symlink_loop_under_nih_images_is_skipped(tmp_path, caplog):
  from test_chestxray import write_nih
  from idat_jax.data.chestxray import ChestXray14Source
  root = str(tmp_path / "nih")
  write_nih(root, ["Effusion", "Mass"], ["Edema"])
  os.symlink("..", os.path.join(root, "images_001", "images", "loop"))
  assert len(_with_alarm(lambda: ChestXray14Source(root, "train"))) == 2
  assert "skipped 1 symbolic link(s)" in caplog.text


# ---------------------------------------------------------------------------------------------
# Item 5: the launcher forwards SIGTERM / SIGINT, leaves no child, and fails in one line.

SLEEPER = (
    "import os, signal, sys, time\n"
    "if os.environ.get('IGNORE_TERM') == os.environ['JAX_PROCESS_ID']:\n"
    "  signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "  signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "print('ready', os.getpid(), flush=True)\n"
    "time.sleep(600)\n")


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
  except FileNotFoundError:
    return False


def _launcher(tmp_path, *launcher_args, env_extra=None, module="sleeper"):
  (tmp_path / "sleeper.py").write_text(SLEEPER)
  env = {**os.environ, "PYTHONPATH": str(tmp_path), **(env_extra or {})}
  return subprocess.Popen(
      [sys.executable, "-m", "idat_jax.launch", "-d", "1", "--module", module, *launcher_args],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _child_pids(proc, count):
  pids = []
  while len(pids) < count:
    line = proc.stdout.readline()
    assert line, "the launcher ended before its children were ready"
    if " ready " in line:
      pids.append(int(line.split()[-1]))
  return pids


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_launcher_leaves_no_child_running(tmp_path, signum):
  # Process 1 ignores the signal: it must be SIGKILLed after the grace period.
  proc = _launcher(tmp_path, "-n", "2", "--grace_s", "1", env_extra={"IGNORE_TERM": "1"})
  try:
    pids = _child_pids(proc, 2)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  try:
    assert proc.returncode == 128 + signum, out
    name = signal.Signals(signum).name
    assert (f"FAILED: received {name}; forwarded {name} to process(es) [0, 1], SIGKILLed [1] "
            "still running after 1 s") in out
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
      time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], out
  finally:
    for p in pids:
      if _alive(p):
        os.kill(p, signal.SIGKILL)


def test_launcher_with_no_processes_is_one_line():
  out = subprocess.run([sys.executable, "-m", "idat_jax.launch", "-n", "0", "--", "x"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: need at least 1 process and 1 device per process, got --num_processes 0 x "
      "--devices_per_process 4"], out.stderr


def test_coordinator_port_in_use_is_one_line_before_any_child():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "idat_jax.launch", "-n", "2", "--port",
                          str(port), "--module", "no_such_module"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 2, out.stdout + out.stderr
  assert out.stdout == ""  # no process was started
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: coordinator port {port} on 127.0.0.1 "
                                                 "is already in use"), lines
  assert "--port 0" in lines[0]
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:  # the same, from the config
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "idat_jax.launch", "-n", "2", "--module",
                          "no_such_module", "--",
                          f"--config.distributed.coordinator_address=127.0.0.1:{port}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
  assert out.stderr.startswith(f"error: coordinator port {port} on 127.0.0.1 is already in use")


@pytest.mark.slow
def test_child_that_dies_at_start_is_named_with_its_exit_code_and_last_line(tmp_path):
  proc = _launcher(tmp_path, "-n", "2", "--grace_s", "1", module="no_such_module")
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 1, out
  failed = [line for line in out.splitlines() if "FAILED:" in line]
  assert len(failed) == 1, out
  assert "exited with code 1 after" in failed[0]
  assert "its last output line: " in failed[0] and "No module named no_such_module" in failed[0]


def test_launcher_that_cannot_start_a_child_stops_the_started_ones(tmp_path):
  from idat_jax import launch
  with pytest.raises(launch.LaunchError, match="cannot start process 0"):
    launch.launch([], num_processes=2, devices_per_process=1,
                  python=str(tmp_path / "no-python"))


# ---------------------------------------------------------------------------------------------
# Item 6 end to end, and the NaN message without a checkpoint (tiny digits ViT: depth 2,
# width 32, 16 px; the helpers of test_run_safety).

from test_run_safety import STEPS_PER_EPOCH, checkpoint_steps, cli  # noqa: E402
from test_run_safety import config_file  # noqa: E402,F401  (a fixture)


def _load_config(path, arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("safety_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.slow
def test_retrained_step_replaces_the_corrupt_one_and_every_checkpoint_restores(config_file,
                                                                               tmp_path):
  from idat_jax import train
  workdir = tmp_path / "run"
  corrupt = 2 * STEPS_PER_EPOCH  # an epoch end: the resumed run saves this step again
  fast = "--config.eval_every_epochs=0"  # no eval program to compile
  out = cli(config_file, workdir, fast, f"--config.stop_after_steps={corrupt}", arg="epochs=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH, corrupt]
  _corrupt_state(str(workdir), corrupt)
  resumed = cli(config_file, workdir, fast, arg="epochs=3")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"restored step {STEPS_PER_EPOCH} instead" in resumed.stderr
  assert f"moved the unrestorable checkpoint step {corrupt} aside" in resumed.stderr
  # Before: [corrupt (still the broken files), 3 epochs]; Orbax had skipped the re-save.
  assert checkpoint_steps(workdir) == [corrupt, 3 * STEPS_PER_EPOCH]
  kept = glob.glob(str(workdir / "checkpoints" / f"corrupt-{corrupt}-*"))
  assert len(kept) == 1 and os.path.isdir(kept[0])
  config = _load_config(config_file, "epochs=3")
  for step in checkpoint_steps(workdir):
    params = train.restore_params(config, str(workdir), step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), step
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary["finished"] and summary["step"] == 3 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_nan_before_any_checkpoint_says_there_is_none(tmp_path):
  from idat_jax import demo, train
  data_root = str(tmp_path / "data")
  demo.prepare_data(data_root, 0)
  config = demo.demo_config("pretrain_small", data_root, seed=0, epochs=1)
  config.optim.lr = 1e30
  config.optim.warmup_epochs = 0
  config.num_devices = 1
  config.progress_bar = False
  config.eval_every_epochs = 0
  config.log_every_steps = 2
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "step None" not in message
  assert "There is no checkpoint to resume from" in message
