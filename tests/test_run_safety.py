"""No silent wrong results: the work-dir lock, config-checked resume, run-control validation,
one result row per run, corrupt checkpoints, one-line errors and metrics after a resume.

Every case is driven through the CLI (``python -m idat_jax.main``) where a user would meet it,
on a tiny supervised ViT on the embedded digits (2 epochs of 14 steps).
"""

import csv
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from idat_jax import demo, train
from idat_jax.errors import CheckpointError, ConfigError, WorkdirError
from idat_jax.training import workdir as wd
from idat_jax.training.checkpointing import Checkpointer

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 700 // 50  # digits 0-4: 700 training images, batch 50
EPOCHS = 2

CONFIG_FILE = '''"""Tiny supervised digits run (tests/test_run_safety.py)."""

from idat_jax import config_lib, demo


def get_config(arg=None):
  a = config_lib.parse_arg(arg, epochs={epochs})
  c = demo.demo_config("pretrain_small", {data_root!r}, seed=0, epochs=a.epochs)
  c.optim.warmup_epochs = 1
  c.num_devices = 1
  c.progress_bar = False
  c.eval_every_epochs = 1
  c.log_every_steps = 5
  c.keep_checkpoints = 2
  return c
'''


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("safety")
  data_root = str(root / "data")
  demo.prepare_data(data_root, 0)
  path = root / "digits_small.py"
  path.write_text(CONFIG_FILE.format(data_root=data_root, epochs=EPOCHS))
  return str(path)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
  env.pop("XLA_FLAGS", None)
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(
        jax.config.jax_persistent_cache_min_compile_time_secs))
  return env


def cli(config_file, workdir, *overrides, arg="", timeout=300):
  config = config_file + (f":{arg}" if arg else "")
  return subprocess.run([sys.executable, "-m", "idat_jax.main", "--config", config,
                         "--workdir", str(workdir), "--json", *overrides],
                        env=_env(), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(out, phrase, library_errors_logged=False):
  """``library_errors_logged``: libraries' own ERROR log records (Orbax and tensorboardX log
  a failed background write with its traceback) may precede our report."""
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  report = [line for line in out.stderr.splitlines()
            if line.startswith("error:") or line.startswith("(traceback")]
  assert report and report[0].startswith("error: "), out.stderr[-3000:]
  assert phrase in report[0], report[0]
  if not library_errors_logged:
    assert "Traceback (most recent call last)" not in out.stderr, out.stderr[-3000:]
  # The report is the end of stderr: the message and where its traceback went.
  tail = out.stderr.strip().splitlines()
  start = max(i for i, line in enumerate(tail) if line.startswith("error: "))
  assert len(tail) - start <= 2, tail[start:]
  return report[0]


def result_rows(workdir):
  path = os.path.join(workdir, "results.csv")
  if not os.path.exists(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def checkpoint_steps(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def finished(config_file, tmp_path_factory):
  """One finished CLI run shared by the read-only cases below."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  out = cli(config_file, workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  return str(workdir), json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# One result row per run; config records; metrics after a resume.


def test_rerunning_a_finished_run_adds_no_row(config_file, finished):
  workdir, summary = finished
  assert summary["finished"] and summary["step"] == EPOCHS * STEPS_PER_EPOCH
  assert len(result_rows(workdir)) == 1
  t0 = time.time()
  again = cli(config_file, workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  stored = json.loads(again.stdout.strip().splitlines()[-1])
  assert stored["already_finished"] is True
  assert stored["last_top1"] == summary["last_top1"] and stored["step"] == summary["step"]
  assert len(result_rows(workdir)) == 1
  assert "nothing to train, no result row added" in again.stderr
  print("re-run of a finished run took", round(time.time() - t0, 1), "s")
  # The fresh run's config is config.json; the re-run did not overwrite it.
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["mode"] == "train"


def test_a_stop_between_summary_and_result_row_gives_one_row(config_file, tmp_path):
  """Issue 19, item 3: "finished" is one fact on disk. Both states a kill can leave between the
  two writes are rebuilt from a real run: the rerun ends with exactly one row, of that run."""
  workdir = str(tmp_path / "run")
  out = cli(config_file, workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json"), encoding="utf-8"))
  rows = result_rows(workdir)
  assert len(rows) == 1 and rows[0]["run_id"] == summary["run_id"] and summary["run_id"]
  row_text = open(os.path.join(workdir, "results.csv"), encoding="utf-8").read()
  # 1. Killed after summary.json, before the row: the rerun adds the row from the summary.
  os.remove(os.path.join(workdir, "results.csv"))
  again = cli(config_file, workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "its result row was missing and is added now" in again.stderr
  assert open(os.path.join(workdir, "results.csv"), encoding="utf-8").read() == row_text
  # 2. The row without summary.json (an older version's order): the run is finished from its
  # last checkpoint, and the row already there is not written a second time.
  os.remove(os.path.join(workdir, "summary.json"))
  again = cli(config_file, workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  rows = result_rows(workdir)
  assert len(rows) == 1 and rows[0]["run_id"] == summary["run_id"]
  assert json.load(open(os.path.join(workdir, "summary.json")))["run_id"] == summary["run_id"]
  # 3. A rerun of the finished run adds nothing.
  assert cli(config_file, workdir).returncode == 0 and len(result_rows(workdir)) == 1


def test_eval_mode_keeps_config_json_and_writes_its_own_record(config_file, finished):
  workdir, summary = finished
  before = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  out = cli(config_file, workdir, "--config.mode=eval", "--config.eval_batch_size=100")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["top1"] == summary["last_top1"]
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == before
  records = glob.glob(os.path.join(workdir, "config.eval.*.json"))
  assert len(records) == 1
  with open(records[0], encoding="utf-8") as f:
    assert json.load(f)["eval_batch_size"] == 100


def test_killed_run_resumes_with_each_step_logged_once(config_file, tmp_path):
  workdir = tmp_path / "run"
  stop = STEPS_PER_EPOCH + 3  # mid epoch 1, after the epoch-0 checkpoint at step 14
  first = cli(config_file, workdir, f"--config.stop_after_steps={stop}")
  assert first.returncode == 0, first.stderr[-3000:]
  # Simulate rows logged after the last checkpoint by a killed segment: a row past the
  # checkpoint, and a torn last line.
  metrics = workdir / "metrics.jsonl"
  with open(metrics, "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": stop + 2, "loss": 9.0}) + "\n" + '{"step": 2')
  shutil.rmtree(workdir / "checkpoints" / str(stop))  # as if killed before that save
  resumed = cli(config_file, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  rows = [json.loads(line) for line in open(metrics, encoding="utf-8")]
  loss_steps = [r["step"] for r in rows if "loss" in r]
  assert len(loss_steps) == len(set(loss_steps)), loss_steps
  assert 9.0 not in [r["loss"] for r in rows if "loss" in r]
  evals = [r["step"] for r in rows if "test_top1" in r]
  assert evals == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  # wall_time_s adds the segments: the first segment's time is included.
  (row,) = result_rows(workdir)
  assert float(row["wall_time_s"]) == summary["wall_time_s"] > summary["setup_s"]
  with open(workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH) / "meta" / "metadata",
            encoding="utf-8") as f:
    assert json.load(f)["elapsed_s"] > 0


# ---------------------------------------------------------------------------------------------
# Resume with another config.


def test_resume_with_changed_lr_is_refused_then_overridden_and_recorded(config_file, tmp_path):
  workdir = tmp_path / "run"
  first = cli(config_file, workdir, f"--config.stop_after_steps={STEPS_PER_EPOCH}")
  assert first.returncode == 0, first.stderr[-3000:]
  refused = cli(config_file, workdir, "--config.optim.lr=0.01")
  line = assert_one_line_error(refused, "holds a run with another config")
  assert "optim/lr: 0.003 -> 0.01" in line and "resume_changed=True" in line
  assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH]
  # Run controls may change between segments without an override.
  assert "log_every_steps" not in str(wd.trajectory_config(train.config_lib.base_config()))
  forced = cli(config_file, workdir, "--config.optim.lr=0.01", "--config.resume_changed=True",
               "--config.log_every_steps=7")
  assert forced.returncode == 0, forced.stderr[-3000:]
  summary = json.loads(forced.stdout.strip().splitlines()[-1])
  (override,) = summary["resume_overrides"]
  assert override["step"] == STEPS_PER_EPOCH
  assert override["changes"] == ["optim/lr: 0.003 -> 0.01"]
  records = sorted(glob.glob(str(workdir / "config.train.*.json")))
  assert len(records) == 1 and json.load(open(records[0]))["optim"]["lr"] == 0.01
  assert json.load(open(workdir / "config.json"))["optim"]["lr"] == 0.003


def test_resume_with_another_task_is_refused(config_file, tmp_path):
  workdir = tmp_path / "run"
  assert cli(config_file, workdir, "--config.stop_after_steps=3").returncode == 0
  out = cli(config_file, workdir, "--config.data.task=digits_5to9")
  assert_one_line_error(out, 'data/task: "digits_0to4" -> "digits_5to9"')


# ---------------------------------------------------------------------------------------------
# The work-dir lock.


def test_second_run_on_a_busy_workdir_is_refused_at_once(config_file, tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(
      [sys.executable, "-m", "idat_jax.main", "--config", config_file, "--workdir",
       str(workdir), "--config.optim.epochs=30"], env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while time.time() < deadline:
      lock = workdir / wd.LOCK_FILE
      if lock.exists() and lock.read_text().strip():
        break
      time.sleep(0.2)
    else:
      pytest.fail("the first run never took the lock")
    t0 = time.time()
    second = cli(config_file, workdir, "--config.optim.epochs=30")
    waited = time.time() - t0
    line = assert_one_line_error(second, f"work dir {workdir} is in use by pid {first.pid} on ")
    print(line, f"(refused in {waited:.1f} s)")
    assert first.poll() is None  # the first run was not disturbed
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The killed run's lock is taken over by the next run, with a warning.
  lock = wd.WorkdirLock(str(workdir))
  lock.acquire()
  lock.release()
  assert not (workdir / wd.LOCK_FILE).exists()


def test_lock_takeover_after_a_dead_holder(tmp_path, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket
  (workdir / wd.LOCK_FILE).write_text(json.dumps({"pid": dead.pid,
                                                  "host": socket.gethostname()}))
  with wd.WorkdirLock(str(workdir)):
    holder = json.loads((workdir / wd.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(WorkdirError, match=f"in use by pid {os.getpid()}"):
      # flock is per open file description: a second acquire in this process conflicts too.
      wd.WorkdirLock(str(workdir)).acquire()
  assert "taking over the lock" in caplog.text
  # A record from another host is refused (flock may not reach across hosts).
  (workdir / wd.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(WorkdirError, match="in use by pid 1 on elsewhere.*delete that file"):
    wd.WorkdirLock(str(workdir)).acquire()


# ---------------------------------------------------------------------------------------------
# Run controls and splits, checked before any work.


@pytest.mark.parametrize("override,phrase", [
    ("--config.keep_checkpoints=0", "config.keep_checkpoints=0: must be an integer >= 1 (0 "
                                    "would delete every checkpoint"),
    ("--config.checkpoint_every_epochs=0", "config.checkpoint_every_epochs=0: must be"),
    ("--config.log_every_steps=0", "config.log_every_steps=0: must be"),
    ("--config.optim.accum_steps=0", "config.optim.accum_steps=0: must be"),
])
def test_meaningless_run_controls_are_refused_up_front(config_file, tmp_path, override, phrase):
  out = cli(config_file, tmp_path / "run", override)
  assert_one_line_error(out, phrase)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_test_split_is_found_before_model_init(config_file, tmp_path, monkeypatch):
  import importlib.util
  spec = importlib.util.spec_from_file_location("safety_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.eval_split = "nope"

  from idat_jax.models.vit import VisionTransformer

  def forbidden(*args, **kwargs):
    raise AssertionError("a model was initialised before the split check")

  monkeypatch.setattr(VisionTransformer, "init", forbidden)
  monkeypatch.setattr(VisionTransformer, "apply", forbidden)
  with pytest.raises(Exception, match=r"nope.txt does not exist"):
    train.setup(config, str(tmp_path / "run"))


def test_unknown_config_key_and_argument_are_one_line(config_file, tmp_path):
  out = cli(config_file, tmp_path / "run", "--config.optim.lrr=1")
  line = assert_one_line_error(out, "unknown config key")
  assert "lrr" in line and 'Did you mean "lr"' in line
  out = cli(config_file, tmp_path / "run", arg="epoch=3")
  assert_one_line_error(out, "unknown config argument 'epoch'")
  out = cli(str(tmp_path / "missing.py"), tmp_path / "run")
  assert_one_line_error(out, "cannot load --config")
  assert "missing.py" in out.stderr
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints, shape mismatches, full disks.


def _corrupt_state(workdir, step):
  files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**"),
                                recursive=True)
           if os.path.isfile(p) and "ocdbt" not in p and os.path.getsize(p) > 64]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.seek(8)
      f.write(b"\x00garbage\xff" * 8)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step(config_file, tmp_path):
  workdir = tmp_path / "run"
  out = cli(config_file, workdir, f"--config.stop_after_steps={STEPS_PER_EPOCH + 4}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 4]
  _corrupt_state(str(workdir), STEPS_PER_EPOCH + 4)
  resumed = cli(config_file, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"checkpoint step {STEPS_PER_EPOCH + 4}" in resumed.stderr
  assert f"restored step {STEPS_PER_EPOCH} instead" in resumed.stderr
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary["finished"]


def test_no_restorable_checkpoint_is_one_line(config_file, tmp_path):
  workdir = tmp_path / "run"
  assert cli(config_file, workdir, "--config.stop_after_steps=3").returncode == 0
  _corrupt_state(str(workdir), 3)
  out = cli(config_file, workdir)
  line = assert_one_line_error(out, f"no checkpoint in {workdir / 'checkpoints'} restores")
  assert "step 3:" in line


def test_corrupt_meta_is_one_line(config_file, tmp_path):
  workdir = tmp_path / "run"
  assert cli(config_file, workdir, "--config.stop_after_steps=3").returncode == 0
  meta = workdir / "checkpoints" / "3" / "meta" / "metadata"
  with open(meta, "w", encoding="utf-8") as f:
    f.write("{not json")
  out = cli(config_file, workdir)
  assert_one_line_error(out, "restores into this run's model")


def test_shape_mismatch_on_resume_is_one_line_and_stops_cleanly(config_file, tmp_path):
  workdir = tmp_path / "run"
  assert cli(config_file, workdir, "--config.stop_after_steps=3").returncode == 0
  # Another class count with the override: the restore itself must fail cleanly.
  out = cli(config_file, workdir, "--config.data.num_classes=7",
            "--config.resume_changed=True", timeout=180)
  line = assert_one_line_error(out, "restores into this run's model")
  assert "needs a new --workdir" in line
  assert "sys.meta_path is None" not in out.stderr
  assert checkpoint_steps(workdir) == [3]


def test_full_disk_names_step_and_directory(tmp_path, monkeypatch):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  state = {"w": jax.numpy.ones((4,))}
  ckpt.save(1, state, {"a": 1})
  ckpt.wait()

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "save", no_space)
  with pytest.raises(CheckpointError, match=r"no space left on device while writing "
                                            rf"checkpoint step 2 to {tmp_path / 'checkpoints'}"):
    ckpt.save(2, state, {"a": 2})
  ckpt.close()
  restored, meta = Checkpointer(str(tmp_path / "checkpoints"), create=False).restore(
      None, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  assert meta == {"a": 1}


def test_pretrained_file_that_does_not_fit_names_model_and_file(config_file, finished,
                                                                 tmp_path):
  workdir, _ = finished
  params = train.restore_params(_module_config(config_file), workdir)["student"]
  from idat_jax import checkpoints as ckpt_io
  path = str(tmp_path / "small.npz")
  ckpt_io.save_npz(params, path)
  # The file is the 32-wide small ViT; the config asks for the 64-wide 'large' one.
  overrides = [f"--config.models.student.{k}={v}" for k, v in demo.ARCH["large"].items()]
  out = cli(config_file, tmp_path / "run", f"--config.models.student.checkpoint={path}",
            *overrides)
  line = assert_one_line_error(out, f"pretrained checkpoint {path} does not fit model "
                                    "'student'")
  assert "models.student.variant" in line


def _module_config(config_file):
  import importlib.util
  spec = importlib.util.spec_from_file_location("safety_config2", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_config_changes_lists_every_changed_key():
  saved = {"optim/lr": 0.1, "data/task": "a", "seed": 1}
  current = {"optim/lr": 0.2, "data/task": "a", "new": True}
  assert wd.config_changes(saved, current) == [
      "new: (absent) -> true", "optim/lr: 0.1 -> 0.2", "seed: 1 -> (absent)"]
  base = train.config_lib.base_config()
  keys = wd.trajectory_config(base)
  assert "optim/lr" in keys and "data/task" in keys and "models/student/tuning/mode" in keys
  for control in ("log_every_steps", "progress_bar", "eval_every_epochs", "keep_checkpoints",
                  "compilation_cache_dir", "mode", "resume_changed", "stop_after_steps"):
    assert control not in keys
  bad = base.copy_and_resolve_references()
  bad.keep_checkpoints = 0
  with pytest.raises(ConfigError, match="keep_checkpoints=0"):
    train.config_lib.validate(bad)


def _tmpfs_mountable() -> bool:
  """Whether this machine lets the tests mount a small tmpfs (root in a sandbox that allows it)."""
  import tempfile
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  target = tempfile.mkdtemp(prefix="idat_tmpfs_probe_")
  try:
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", target],
                        capture_output=True).returncode == 0
    if ok:
      subprocess.run(["umount", target], capture_output=True)
    return ok
  finally:
    os.rmdir(target)


@pytest.mark.skipif(not _tmpfs_mountable(), reason="needs permission to mount a small tmpfs "
                    "(the in-process full-disk test above still runs)")
def test_real_full_disk_is_one_line_and_the_run_resumes(config_file, tmp_path):
  mount = tmp_path / "small_fs"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], check=True)
  try:
    workdir = mount / "run"
    args = ("--config.keep_checkpoints=5", "--config.optim.epochs=8",
            f"--config.data.cache_dir={tmp_path / 'cache'}")
    out = cli(config_file, workdir, *args)
    assert_one_line_error(out, "no space left on device",
                          library_errors_logged=True)
    steps = checkpoint_steps(workdir)
    assert steps, "no complete checkpoint before the disk filled"
    subprocess.run(["mount", "-o", "remount,size=20m", str(mount)], check=True)
    resumed = cli(config_file, workdir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {steps[-1]}" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["finished"]
  finally:
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_another_runs_checkpoint_is_read_from_a_relative_path(tmp_path, monkeypatch):
  # The demo passes student_run=runs/demo/weco_distill (relative); Orbax wants absolute paths.
  from idat_jax.checkpoints import read_run_checkpoint
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
  ckpt.save(3, {"w": jax.numpy.arange(4.0)}, {"method": "x"})
  ckpt.close()
  monkeypatch.chdir(tmp_path)
  state, meta = read_run_checkpoint(os.path.join("run", "checkpoints"))
  assert meta == {"method": "x"} and list(state["w"]) == [0.0, 1.0, 2.0, 3.0]


_NOISY_FAIL = '''
import sys, threading, time
from idat_jax import main

def noise():
  while True:
    sys.stderr.write("library thread: still printing\\n")
    sys.stderr.flush()

threading.Thread(target=noise, daemon=True).start()
time.sleep(0.02)
main.fail("boom")
'''


def test_nothing_printed_by_other_threads_follows_the_error_report():
  """Library threads that keep printing (Orbax's after a failed save) cannot end stderr."""
  for _ in range(10):
    out = subprocess.run([sys.executable, "-c", _NOISY_FAIL], env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.rstrip().splitlines()[-1] == "error: boom", out.stderr[-300:]
