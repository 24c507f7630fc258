"""A user's first hour (issue 18, section 3), as a user meets it: through the scripts and the CLI.

* every script runs the project's interpreter ($PYTHON, else .venv, else python3);
* a misconfiguration (a LoRA rank above the width) is one line, with its traceback in a log,
  also when the work dir did not exist yet;
* Ctrl-C is one line (step reached, checkpoint kept, how to resume), exit 130, and resumes;
* the end of a run is a few readable lines, printed once (``--json`` for scripts), and the
  ``.lock`` file is gone;
* the synthetic speed check prints per-epoch times and the full protocol's estimate;
* the repository's license, citation and ignore files.

CLI runs use a student ViT of depth 2 and width 32 on 16 px digits (5 classes, 100 training
images) or on synthetic kitti.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import pytest

from idat_jax import config_lib
from idat_jax.data import write_digits_task
from idat_jax.errors import ConfigError
from idat_jax.methods.base import build_model
from idat_jax.training import report
from idat_jax.training import workdir as wd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "idat_vtab.py")
TINY = dict(variant="custom", width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)
STEPS_PER_EPOCH = 100 // 20


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(
        jax.config.jax_persistent_cache_min_compile_time_secs))
  return env


def _args(root, workdir, arg="method=adapter", *overrides, epochs=2):
  args = ["-m", "idat_jax.main", "--config",
          f"{CONFIG}:task=digits,recipe=custom,ckpt_dir=none,dtype=float32,{arg}",
          "--workdir", str(workdir), f"--config.data.root={root}",
          "--config.data.image_size=16", "--config.batch_size=20",
          "--config.eval_batch_size=256", "--config.progress_bar=False",
          f"--config.optim.epochs={epochs}", "--config.optim.warmup_epochs=1",
          "--config.optim.cooldown_epochs=0"]
  args += [f"--config.models.student.{k}={v}" for k, v in TINY.items()]
  return [sys.executable, *args, *overrides]


def _run(cmd, timeout=300):
  return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                        cwd=REPO)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("first_hour_data")
  write_digits_task(str(root), "digits", classes=range(5), train_size=100)
  return str(root)


# ---------------------------------------------------------------------------------------------
# The scripts find the project's environment.


def _source_env(cwd, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VENV")}
  out = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/python_env.sh"; echo "$PYTHON"'],
                       cwd=cwd, env=dict(base, **env), capture_output=True, text=True,
                       check=True)
  return out.stdout.strip()


def test_every_script_runs_the_project_python(tmp_path):
  shell = sorted(n for n in os.listdir(os.path.join(REPO, "scripts")) if n.endswith(".sh"))
  installers = {"setup_env.sh", "demo.sh", "test.sh"}  # they make .venv, then run it
  for name in set(shell) - installers - {"python_env.sh", "run_tpu.sh"}:
    text = open(os.path.join(REPO, "scripts", name), encoding="utf-8").read()
    assert "python_env.sh" in text, f"scripts/{name} does not source scripts/python_env.sh"
    assert not re.search(r"^\s*(exec\s+)?python3?\s", text, re.M), name
  # $PYTHON as given; else the checkout's .venv, from any directory; else python3.
  assert _source_env(tmp_path, PYTHON="/opt/py/bin/python") == "/opt/py/bin/python"
  assert _source_env(tmp_path, VENV="no-such-venv") == "python3"
  if os.access(os.path.join(REPO, ".venv", "bin", "python"), os.X_OK):
    assert _source_env(tmp_path) == os.path.join(REPO, ".venv", "bin", "python")
  # The TPU workers: $PYTHON names their interpreter; else each worker's .venv, else python3.
  tpu = [os.path.join(REPO, "scripts", "run_tpu.sh"), "--dry_run", "--config", "c.py",
         "--workdir", "gs://b/r"]
  base = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  given = subprocess.run(["bash", *tpu], env=dict(base, PYTHON="/opt/py/bin/python"),
                         capture_output=True, text=True, check=True).stdout.splitlines()[1]
  assert given.startswith("cd ~/idat-jax && /opt/py/bin/python -m idat_jax.main"), given
  found = subprocess.run(["bash", *tpu], env=base, capture_output=True, text=True,
                         check=True).stdout.splitlines()[1]
  assert ".venv/bin/python || echo python3" in found, found


def test_repository_files():
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  assert "source .venv/bin/activate" in readme
  assert "tensorboard --logdir" in readme and "CC BY-NC 4.0" in readme
  assert "@inproceedings{ruan2024idat," in readme and "@article{grigore2024weight," in readme
  assert "Apache License" in open(os.path.join(REPO, "LICENSE"), encoding="utf-8").read()
  yaml = pytest.importorskip("yaml")
  citation = yaml.safe_load(open(os.path.join(REPO, "CITATION.cff"), encoding="utf-8"))
  assert citation["cff-version"] and citation["title"] and citation["license"] == "Apache-2.0"
  ignored = open(os.path.join(REPO, ".gitignore"), encoding="utf-8").read().split()
  for entry in ("runs/", "exported/", "jax_cache/"):
    assert entry in ignored, entry
  pyproject = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
  assert re.search(r'^tensorboard = \["tensorboard>=', pyproject, re.M)


# ---------------------------------------------------------------------------------------------
# Misconfigurations are one line.


def test_lora_rank_is_checked_against_the_width():
  mcfg = config_lib.model_config("custom", mode="lora")
  for key, value in TINY.items():
    mcfg[key] = value
  for rank in (33, 0):
    mcfg.tuning.lora_rank = rank
    with pytest.raises(ConfigError, match=rf"config.models.teacher.tuning.lora_rank={rank}: "
                                          r"must be an integer in 1..32"):
      build_model(mcfg, num_classes=5, image_size=16, name="teacher")
  mcfg.tuning.lora_rank = 32
  build_model(mcfg, num_classes=5, image_size=16, name="teacher")
  named = config_lib.model_config("S/16", mode="lora")
  named.tuning.lora_rank = 385
  with pytest.raises(ConfigError, match=r"lora_rank=385: must be an integer in 1..384"):
    build_model(named, num_classes=5, image_size=16, name="student")


def _one_line_error(out, phrase):
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  tail = out.stderr.strip().splitlines()
  assert tail[-2].startswith("error: ") and phrase in tail[-2], tail[-3:]
  log = re.match(r"\(traceback: (\S+); --verbosity=1 prints it\)", tail[-1])
  assert log and os.path.isfile(log.group(1)), tail[-1]
  return log.group(1)


@pytest.mark.slow
def test_lora_rank_above_the_width_is_one_line_with_a_log(digits_root, tmp_path):
  """Before: a ValueError traceback from inside the trainer, and no error log."""
  workdir = tmp_path / "not" / "yet" / "there"
  out = _run(_args(digits_root, workdir, "method=lora",
                   "--config.models.student.tuning.lora_rank=1000"))
  log = _one_line_error(out, "config.models.student.tuning.lora_rank=1000: must be an integer "
                             "in 1..32")
  assert log.startswith(str(workdir / "logs")) and "ConfigError" in open(log).read()
  assert not (workdir / wd.LOCK_FILE).exists()
  # A config-file error (before any work dir is known) logs to the temp directory.
  out = _run([sys.executable, "-m", "idat_jax.main", "--config", f"{CONFIG}:task=digits,nope=1",
              "--workdir", str(tmp_path / "other")], timeout=120)
  log = _one_line_error(out, "unknown config argument 'nope'")
  assert not log.startswith(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Ctrl-C.

INTERRUPTED = re.compile(r"^interrupted at step (\d+) of (\d+); checkpoint of step (\d+) kept in "
                         r"(\S+); run the same command to resume$")


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_same_command_resumes(digits_root, tmp_path):
  workdir = tmp_path / "run"
  cmd = _args(digits_root, workdir, "method=adapter,eval_every=1000",
              "--config.log_every_steps=1", epochs=1000)
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO)
  try:
    deadline = time.time() + 240
    ckpts = workdir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
      if ((workdir / "metrics.jsonl").exists() and ckpts.is_dir()
          and any(n.isdigit() for n in os.listdir(ckpts))):
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
  match = INTERRUPTED.match(stderr.strip().splitlines()[-1])
  assert match, stderr[-2000:]
  reached, total, kept = (int(g) for g in match.groups()[:3])
  assert total == 1000 * STEPS_PER_EPOCH and 0 < kept <= reached < total
  assert kept % STEPS_PER_EPOCH == 0 and match.group(4) == str(workdir / "checkpoints")
  assert stdout == "" and not (workdir / wd.LOCK_FILE).exists()

  resumed = _run(cmd + [f"--config.stop_after_steps={kept + STEPS_PER_EPOCH}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {kept} " in resumed.stderr
  assert resumed.stdout.startswith(f"stopped early at step {kept + STEPS_PER_EPOCH} ")


# ---------------------------------------------------------------------------------------------
# The end of a run.


@pytest.mark.slow
def test_end_of_run_prints_a_short_summary_once_and_removes_the_lock(digits_root, tmp_path):
  """Before: one JSON line of every summary field on stdout, and again in the log; the empty
  ``.lock`` file stayed in the work dir."""
  workdir = tmp_path / "run"
  out = _run(_args(digits_root, workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(workdir / "summary.json"))
  lines = out.stdout.splitlines()
  assert lines == report.summary_lines(summary)
  assert len(lines) == 3
  assert lines[0].startswith("finished: digits, supervised (gist_seq_adapter): top1 best ")
  assert ", last " in lines[0]
  assert lines[1] == (f"trainable parameters: {summary['trainable_params']:,} of "
                      f"{summary['total_params']:,} "
                      f"({100 * summary['trainable_params'] / summary['total_params']:.3g}%)")
  assert lines[2].startswith("time: ") and str(workdir) in lines[2]
  assert "epoch_times" not in out.stdout + out.stderr  # no JSON dump anywhere
  assert not (workdir / wd.LOCK_FILE).exists()
  # The same command again: nothing trained, said so; --json gives scripts the whole summary.
  again = _run(_args(digits_root, workdir, "method=adapter", "--json"))
  assert again.returncode == 0, again.stderr[-3000:]
  assert len(again.stdout.splitlines()) == 1
  stored = json.loads(again.stdout)
  assert stored["already_finished"] and stored["best"] == summary["best"]
  assert not (workdir / wd.LOCK_FILE).exists()


def test_lock_file_is_removed_and_a_lock_on_a_removed_file_is_taken_again(tmp_path,
                                                                          monkeypatch):
  path = tmp_path / wd.LOCK_FILE
  with wd.WorkdirLock(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert not path.exists()
  # The previous holder releases (removes the file) between this run's open and its flock:
  # the lock it then gets is on a file no other run can see, so it must lock the new one.
  path.write_text("")
  flock, removed = wd.fcntl.flock, []

  def release_in_between(fd, op):
    if not removed:
      removed.append(True)
      os.unlink(path)
    return flock(fd, op)

  monkeypatch.setattr(wd.fcntl, "flock", release_in_between)
  lock = wd.WorkdirLock(str(tmp_path)).acquire()
  try:
    assert removed and path.exists()
    assert os.stat(path).st_ino == os.fstat(lock._fd).st_ino
  finally:
    lock.release()
  assert not path.exists()


# ---------------------------------------------------------------------------------------------
# The synthetic speed check.


def test_speed_lines_extrapolate_a_partial_measurement():
  summary = {"epochs": 110, "setup_s": 10.0, "best": 1.0, "last": 1.0,
             "epoch_times": [[1, 5.0, 0.0, 0.5]] + [[e, 1.0, 0.0, 0.2] for e in range(2, 10)]
             + [[10, 1.0, 3.0, 0.2], [11, 1.0, 0.0, 0.2]]}
  lines = report.speed_lines(summary, eval_every_epochs=10)
  assert lines[1].split() == ["epoch", "train", "s", "eval", "s", "checkpoint", "s"]
  assert lines[2].split() == ["1", "5.00", "-", "0.50", "(includes", "compilation)"]
  assert lines[11].split() == ["10", "1.00", "3.00", "0.20"]
  # 10 s setup + first epoch, eval, checkpoint (5 + 3 + 0.5) + 109 x 1 s + 109 x 0.2 s; the
  # 10 later evaluations (epochs 20 ... 110) are counted at the first's 3 s (the only one).
  assert lines[13] == ("  full protocol: 110 epochs, 11 test evaluations (every 10 epochs), "
                       "110 checkpoints: about 3.0 min")
  total = 10 + 5 + 3 + 0.5 + 109 * 1.0 + 10 * 3.0 + 109 * 0.2
  assert report.duration(total) == "3.0 min"


@pytest.mark.slow
def test_synthetic_speed_check_prints_epoch_times_and_the_estimate(tmp_path):
  """Before: the epoch times were only in the JSON summary, unlabelled, with no estimate."""
  args = [sys.executable, "-m", "idat_jax.main", "--config",
          f"{CONFIG}:task=kitti,backend=synthetic,ckpt_dir=none,dtype=float32,method=adapter,"
          "eval_every=2", "--workdir", str(tmp_path / "kitti"), "--config.data.image_size=16",
          "--config.optim.epochs=3", "--config.optim.cooldown_epochs=0",
          "--config.optim.warmup_epochs=0", "--config.batch_size=500",
          "--config.eval_batch_size=256", "--config.progress_bar=False"]
  args += [f"--config.models.student.{k}={v}" for k, v in TINY.items()]
  out = _run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(tmp_path / "kitti" / "summary.json"))
  speed = report.speed_lines(summary, eval_every_epochs=2, checkpoint_every_epochs=1)
  assert out.stdout.splitlines() == report.summary_lines(summary) + speed
  assert speed[0].startswith("speed check (synthetic images")
  rows = [line.split() for line in speed[2:5]]
  assert [r[0] for r in rows] == ["1", "2", "3"] and rows[0][2] == "-"  # no eval at epoch 1
  assert all(float(r[1]) >= 0 and float(r[3]) >= 0 for r in rows)
  # The whole protocol was measured: the estimate is the measured time.
  measured = summary["setup_s"] + sum(sum(t[1:]) for t in summary["epoch_times"]
                                      if t[0] != 1) + sum(summary["epoch_times"][0][1::2])
  assert speed[5] == ("  full protocol: 3 epochs, 2 test evaluations (every 2 epochs), "
                      f"3 checkpoints: about {report.duration(measured)}")
