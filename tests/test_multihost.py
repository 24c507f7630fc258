"""Multi-host for real: 2 JAX processes x 4 CPU devices against 1 process x 8 devices.

The 2-process runs go through ``python -m idat_jax.launch`` (what ``scripts/launch_local.sh``
runs): ``jax.distributed.initialize`` on a local coordinator, gloo collectives, per-process
data shares, Orbax saves from both processes, metrics from process 0. The 1-process reference
runs in this pytest process (8 fake devices, tests/conftest.py), from the same config file.

Every launched process runs ``idat_jax.main`` behind a small wrapper that logs each image file
it opens, so the tests can check that each process read only its share.

Tiny models on the embedded digits tasks: the VTAB folder layout (iDAT, supervised adapter
tuning) and an image folder (WeCoLoRA distillation with streamed augmented batches and gradient
accumulation; linear probe on cached features). The subprocesses share one persistent
compilation cache (``<tmp>/jax_cache``, the trainer's default next to the work dirs).
"""

import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from vit_testing import random_params

from idat_jax import checkpoints as ck
from idat_jax import launch, sharding, train
from idat_jax.models import build_vit
from idat_jax.checkpoints import read_run_checkpoint
from idat_jax.tree_util import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, DEVICES = 2, 4
LOSS_RTOL = 1e-6
PARAM_RTOL = 1e-6
KILL_DEADLINE_S = 60.0
METHODS = ("idat", "supervised", "wecolora", "linear_probe")
ARCH = {"width": 32, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}
IMAGE_SIZE = 16
TEACHER_DEPTH = 4  # WeCoLoRA teacher; the r=2 student keeps blocks 0 and 2

CONFIG_FILE = '''"""Tiny multi-host test runs (written by tests/test_multihost.py)."""

from idat_jax import config_lib

FOLDER_ROOT = {folder_root!r}
IMAGE_ROOT = {image_root!r}
TEACHER = {teacher!r}
ARCH = {arch!r}


def _model(checkpoint, mode, depth):
  m = config_lib.model_config("custom", checkpoint, mode)
  m.update(dict(ARCH, depth=depth))
  return m


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method="idat", epochs=3)
  c = config_lib.base_config()
  c.method = a.method
  c.seed = 0
  c.data.image_size = {image_size}
  c.batch_size = 40
  c.eval_batch_size = 80
  c.log_every_steps = 1
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 5
  c.progress_bar = False
  c.optim.update(dict(epochs=a.epochs, warmup_epochs=1, cooldown_epochs=0, warmup_lr=1e-6,
                      min_lr=1e-6))
  if a.method in ("idat", "supervised"):
    c.data.update(dict(backend="folder", root=FOLDER_ROOT, task="digits_5to9", num_classes=5))
    c.models.student = _model("", "gist_seq_adapter", 2)
    c.models.teacher = _model("", "gist_seq_adapter", 1)
    c.optim.update(dict(name="adamw", lr=1e-2, schedule="timm_cosine_epoch"))
  else:
    c.data.update(dict(backend="image_folder", root=IMAGE_ROOT, train_split="train",
                       eval_split="val", few_shot_ratio=0.25))
    c.models.teacher = _model(TEACHER, "full", {teacher_depth})
  if a.method == "wecolora":
    c.wecolora.reduction = 2
    c.data.augment = True
    c.batch_size = 48  # 296 images: 6 steps an epoch, none trimmed by the accumulation
    c.models.student = _model("", "lora", {teacher_depth})
    c.models.student.tuning.lora_rank = 4
    c.optim.update(dict(name="adamw", lr=4e-3, b1=0.9, b2=0.95, weight_decay=0.05,
                        schedule="half_cycle_cosine", accum_steps=2, min_lr=0.0))
    c.eval_every_epochs = 0
  elif a.method == "linear_probe":
    c.probe.reduction = 2
    c.optim.update(dict(name="lars", lr=2.0, weight_decay=0.0, momentum=0.9,
                        schedule="half_cycle_cosine", min_lr=0.0))
  return c
'''

# Runs idat_jax.main after wrapping the image reader: every opened file goes to
# $READ_LOG.<process id>, one path a line.
READ_LOG_MAIN = '''import os
from absl import app
from idat_jax.data import preprocess

_load = preprocess.load_image_file
_log = os.environ["READ_LOG"] + "." + os.environ.get("JAX_PROCESS_ID", "0")


def _logged(path, *args, **kwargs):
  with open(_log, "a", encoding="utf-8") as f:
    f.write(os.path.abspath(path) + "\\n")
  return _load(path, *args, **kwargs)


preprocess.load_image_file = _logged
from idat_jax import main  # noqa: E402  (defines the flags)
app.run(main.main)
'''


# ---------------------------------------------------------------------------------------------
# Helpers.


def _write_image_folder(root):
  """``<root>/{train,val}/class<d>/<i>.png``: 1200 training digits and the 597 others."""
  from PIL import Image

  from idat_jax.data.digits import digits_uint8
  images, labels = digits_uint8()
  for split, indices in (("train", range(1200)), ("val", range(1200, len(labels)))):
    for i in indices:
      d = os.path.join(root, split, f"class{labels[i]}")
      os.makedirs(d, exist_ok=True)
      Image.fromarray(images[i]).convert("RGB").save(os.path.join(d, f"{i:04d}.png"))


def _launcher_cmd(args, num_processes=PROCESSES, devices=DEVICES, launcher_args=()):
  return [sys.executable, "-m", "idat_jax.launch", "--num_processes", str(num_processes),
          "--devices_per_process", str(devices), "--module", "read_log_main", "--grace_s", "5",
          *launcher_args, "--", *args]


def _env(env_root, read_log):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([env_root, REPO, env.get("PYTHONPATH", "")])
  env["READ_LOG"] = read_log
  return env


def _main_args(env, config_arg, workdir, *extra):
  return ["--config", f"{env['config']}:{config_arg}", "--workdir", workdir, "--json", *extra]


def _launch(env, config_arg, workdir, *extra, timeout=300):
  """Runs the launcher to the end; returns (exit code, output)."""
  proc = subprocess.run(
      _launcher_cmd(_main_args(env, config_arg, workdir, *extra)),
      env=_env(env["root"], os.path.join(workdir + ".reads")), capture_output=True, text=True,
      timeout=timeout, cwd=REPO, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _start(env, config_arg, workdir, *extra, launcher_args=()):
  """The launcher in its own session (so the test can kill it with all its processes); its
  output goes to ``<workdir>.log`` (the child keeps its own handle of the file)."""
  with open(workdir + ".log", "w", encoding="utf-8") as log:
    return subprocess.Popen(
        _launcher_cmd(_main_args(env, config_arg, workdir, *extra), launcher_args=launcher_args),
        env=_env(env["root"], workdir + ".reads"), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, cwd=REPO)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _summary(output):
  """The run summary process 0 prints as its last JSON line."""
  lines = [ln[len("[p0] "):] for ln in output.splitlines() if ln.startswith("[p0] {")]
  assert lines, output[-3000:]
  return json.loads(lines[-1])


def _config(env, config_arg):
  spec = importlib.util.spec_from_file_location("multihost_config", env["config"])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(config_arg)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _losses(rows):
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _trainable(workdir, step=None):
  state, meta = read_run_checkpoint(os.path.join(workdir, "checkpoints"), step)
  return {k: np.asarray(v) for k, v in flatten(state["trainable"]).items()}, meta


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _committed_steps(workdir):
  """Finished Orbax checkpoints (temporary directories are not plain step numbers)."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def _wait_for_checkpoint(proc, workdir, timeout=240):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if _committed_steps(workdir):
      return _committed_steps(workdir)[0]
    assert proc.poll() is None, _read(workdir + ".log")[-3000:]
    time.sleep(0.1)
  raise AssertionError(f"no checkpoint in {workdir} after {timeout} s")


def _reads(workdir):
  """{process id: [opened paths]} of a launched run."""
  out = {}
  for path in glob.glob(workdir + ".reads.*"):
    with open(path, encoding="utf-8") as f:
      out[int(path.rsplit(".", 1)[1])] = f.read().split()
  return out


# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("multihost"))
  from idat_jax.data.digits import write_digits_task
  folder_root = os.path.join(root, "folder")
  write_digits_task(folder_root, name="digits_5to9", classes=(5, 6, 7, 8, 9), train_size=500,
                    seed=0)
  image_root = os.path.join(root, "image_folder")
  _write_image_folder(image_root)
  teacher = os.path.join(root, "teacher.npz")
  ck.save_npz(random_params(build_vit(None, 0, image_size=IMAGE_SIZE, depth=TEACHER_DEPTH,
                                      **ARCH), seed=0), teacher)
  config = os.path.join(root, "multihost_config.py")
  with open(config, "w", encoding="utf-8") as f:
    f.write(CONFIG_FILE.format(folder_root=folder_root, image_root=image_root, teacher=teacher,
                               arch=ARCH, image_size=IMAGE_SIZE, teacher_depth=TEACHER_DEPTH))
  with open(os.path.join(root, "read_log_main.py"), "w", encoding="utf-8") as f:
    f.write(READ_LOG_MAIN)
  return {"root": root, "config": config, "folder_root": folder_root, "image_root": image_root}


@pytest.fixture(scope="module")
def runs(env):
  """method -> {'two': (workdir, summary), 'one': (workdir, summary)}, each run once."""
  cache = {}

  def get(method):
    if method not in cache:
      arg = f"method={method}"
      two = os.path.join(env["root"], f"{method}_2x{DEVICES}")
      t0 = time.time()
      rc, out = _launch(env, arg, two)
      t_two = time.time() - t0
      assert rc == 0, out[-5000:]
      one = os.path.join(env["root"], f"{method}_1x8")
      t0 = time.time()
      summary_one = train.train_and_evaluate(_config(env, arg), one)
      print(f"\n[multihost] {method}: 2x{DEVICES} run {t_two:.1f} s, 1x8 run "
            f"{time.time() - t0:.1f} s")
      cache[method] = {"two": (two, _summary(out), out), "one": (one, summary_one)}
    return cache[method]

  return get


# ---------------------------------------------------------------------------------------------
# Tests.


def test_distributed_arguments_from_config_and_environment(monkeypatch):
  for name in (sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID, sharding.ENV_COORDINATOR):
    monkeypatch.delenv(name, raising=False)
  from idat_jax import config_lib
  c = config_lib.base_config()
  assert sharding.distributed_arguments(c) is None  # one process: no initialize
  assert sharding.distributed_arguments(False) is None
  # enabled alone: everything from JAX's auto-detection (the TPU VM zero-argument call).
  auto = sharding.distributed_arguments(True)
  assert (auto["coordinator_address"], auto["num_processes"], auto["process_id"]) == \
      (None, None, None)
  monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "4")
  monkeypatch.setenv(sharding.ENV_PROCESS_ID, "3")
  monkeypatch.setenv(sharding.ENV_COORDINATOR, "10.0.0.1:1234")
  got = sharding.distributed_arguments(c)  # a launcher's environment switches it on
  assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == \
      ("10.0.0.1:1234", 4, 3)
  assert got["heartbeat_timeout_seconds"] == c.distributed.heartbeat_timeout_s
  c.distributed.update({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1})
  got = sharding.distributed_arguments(c.distributed)  # config keys win over the environment
  assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == ("h:1", 2, 1)
  c.distributed.process_id = 2
  with pytest.raises(ValueError, match="process_id=2"):
    sharding.distributed_arguments(c)
  assert sharding.process_tag() == ""  # a single process: no suffix on shared file names


def test_launcher_names_the_failed_process_and_stops_the_others(tmp_path):
  """A process that fails ends the launch with its code; a sleeping peer is stopped."""
  script = tmp_path / "victim.py"
  script.write_text(
      "import os, sys, time\n"
      "if os.environ['JAX_PROCESS_ID'] == '1':\n"
      "  print('process 1 fails', flush=True); sys.exit(3)\n"
      "print('devices', os.environ['XLA_FLAGS'], flush=True); time.sleep(600)\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "idat_jax.launch", "-n", "2", "-d", "3", "--module", "victim",
       "--grace_s", "2"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
      check=False)
  assert time.time() - t0 < 30
  assert proc.returncode == 3, proc.stdout
  assert "[p1] process 1 fails" in proc.stdout
  assert "--xla_force_host_platform_device_count=3" in proc.stdout
  assert re.search(r"FAILED: process 1 \(pid \d+\) exited with code 3", proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(runs, method):
  r = runs(method)
  two, summary_two, _ = r["two"]
  one, summary_one = r["one"]
  rows_two, rows_one = _metrics(two), _metrics(one)
  # Only process 0 writes metrics (a second writer would duplicate every row).
  assert [x["step"] for x in rows_two] == [x["step"] for x in rows_one]
  losses_two, losses_one = _losses(rows_two), _losses(rows_one)
  assert len(losses_one) == summary_one["epochs"] * (len(losses_one) // summary_one["epochs"])
  worst = max(abs(losses_two[s] - losses_one[s]) / abs(losses_one[s]) for s in losses_one)
  print(f"[multihost] {method}: {len(losses_one)} steps, worst loss rel. diff {worst:.2e}")
  assert worst <= LOSS_RTOL
  assert [x.get("test_top1") for x in rows_two] == [x.get("test_top1") for x in rows_one]
  for key in ("best_top1", "last_top1", "trainable_params", "finished"):
    assert summary_two[key] == summary_one[key], key
  params_two, meta_two = _trainable(two)
  params_one, meta_one = _trainable(one)
  assert meta_two["history"] == meta_one["history"]
  assert params_two.keys() == params_one.keys()
  worst = max(_rel(params_two[k], params_one[k]) for k in params_one)
  assert worst <= PARAM_RTOL, worst
  with open(os.path.join(two, "results.csv"), encoding="utf-8") as f:
    assert len(f.read().splitlines()) == 2  # header + one row: only process 0 appends
  assert os.path.isfile(os.path.join(two, "config.json"))
  if method == "wecolora":  # the merged export, written by process 0
    merged_two = ck.load_params(os.path.join(two, "student_merged.npz"))
    merged_one = ck.load_params(os.path.join(one, "student_merged.npz"))
    flat_two, flat_one = flatten(merged_two), flatten(merged_one)
    assert flat_two.keys() == flat_one.keys()
    assert max(_rel(flat_two[k], flat_one[k]) for k in flat_one) <= PARAM_RTOL


@pytest.mark.slow
def test_each_process_reads_only_its_share(env, runs):
  """Resident (folder) and streamed (image folder) inputs: disjoint shares, each file once."""
  two = runs("idat")["two"][0]
  reads = _reads(two)
  assert sorted(reads) == [0, 1]
  task_dir = os.path.join(env["folder_root"], "digits_5to9")

  def listed(split):
    with open(os.path.join(task_dir, f"{split}.txt"), encoding="utf-8") as f:
      return [os.path.abspath(os.path.join(task_dir, ln.split()[0])) for ln in f if ln.strip()]

  train, test = listed("train800val200"), listed("test")
  # Resident train set: rows [0, 252) and [252, 504) of the set padded to 8 devices (500 real
  # rows); evaluation: contiguous halves (tfds.even_splits).
  expected = {0: train[:252] + test[:len(test) // 2], 1: train[252:] + test[len(test) // 2:]}
  for p in (0, 1):  # the decode cache is written on the first read: each file once
    assert sorted(reads[p]) == sorted(expected[p])

  weco_two, summary, _ = runs("wecolora")["two"]
  weco = _reads(weco_two)
  steps = summary["epochs"] * (len(_losses(_metrics(weco_two))) // summary["epochs"])
  per_process = steps * 48 // PROCESSES  # every step decodes its half of the global batch
  assert [len(weco[0]), len(weco[1])] == [per_process, per_process]
  train_root = os.path.join(env["image_root"], "train")
  assert all(p.startswith(train_root) for p in weco[0] + weco[1])


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(env, runs):
  """2-process checkpoint evaluated by 1 process, and the 1-process one by 2 processes."""
  two, summary_two, _ = runs("idat")["two"]
  one, summary_one = runs("idat")["one"]
  config = _config(env, "method=idat")
  with config.unlocked():
    config.mode = "eval"
  result = train.evaluate_checkpoint(config, two)
  assert result["top1"] == summary_two["last_top1"] == result["reported_last_top1"]
  assert result["eval_examples"] == 396
  rc, out = _launch(env, "method=idat", one, "--config.mode=eval")
  assert rc == 0, out[-5000:]
  result = _summary(out)
  assert result["top1"] == summary_one["last_top1"] == result["reported_last_top1"]
  assert result["eval_examples"] == 396


@pytest.mark.slow
def test_kill_both_and_resume_is_bit_identical(env, runs):
  two, summary, _ = runs("idat")["two"]
  workdir = os.path.join(env["root"], "idat_killed")
  proc = _start(env, "method=idat", workdir)
  try:
    first = _wait_for_checkpoint(proc, workdir)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes, at once
    proc.wait(timeout=30)
  assert not os.path.exists(os.path.join(workdir, "results.csv")), "killed after the end"
  rc, out = _launch(env, "method=idat", workdir)
  assert rc == 0, out[-5000:]
  assert re.search(r"resumed from step \d+", out), out[-3000:]
  resumed = _summary(out)
  assert resumed["finished"] and resumed["last_top1"] == summary["last_top1"]
  params, _ = _trainable(workdir)
  reference, _ = _trainable(two)
  for k in reference:
    np.testing.assert_array_equal(params[k], reference[k], err_msg=k)
  # Every step logged after the kill (from the checkpoint on) equals the uninterrupted run.
  losses, ref_losses = _losses(_metrics(workdir)), _losses(_metrics(two))
  assert all(losses[s] == ref_losses[s] for s in ref_losses if s > first)
  print(f"[multihost] killed after the step-{first} checkpoint, resumed bit-identically")


@pytest.mark.slow
def test_sigkill_one_process_fails_the_launch_fast(env, runs):
  """Process 1 is SIGKILLed after a checkpoint. The launcher lets the survivor end by itself
  (the JAX heartbeat, 10 s here), then fails naming process 1, well within a minute."""
  workdir = os.path.join(env["root"], "idat_one_killed")
  proc = _start(env, "method=idat,epochs=30", workdir,
                     "--config.distributed.heartbeat_timeout_s=10",
                     launcher_args=("--survivor_wait_s", "40"))
  try:
    _wait_for_checkpoint(proc, workdir)
    output = _read(workdir + ".log")
    pid = int(re.search(r"process 1/2 pid (\d+)", output).group(1))
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    rc = proc.wait(timeout=KILL_DEADLINE_S + 30)
    elapsed = time.monotonic() - t0
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  output = _read(workdir + ".log")
  print(f"[multihost] launcher exited {rc} {elapsed:.1f} s after SIGKILL of process 1")
  assert rc == 128 + signal.SIGKILL and elapsed < KILL_DEADLINE_S
  assert re.search(rf"FAILED: process 1 \(pid {pid}\) killed by SIGKILL", output), output[-3000:]
  # Process 0 was not stopped by the launcher: the coordination service ended it, naming
  # the task that stopped sending heartbeats.
  assert "process 0 ended by itself" in output, output[-3000:]
  assert re.search(r"\[p0\].*(unhealthy|stopped sending heartbeats|another task died)", output)
  # The last complete checkpoint restores and evaluates to what the run reported for it.
  config = _config(env, "method=idat,epochs=30")
  with config.unlocked():
    config.mode = "eval"
  result = train.evaluate_checkpoint(config, workdir)
  assert result["step"] == _committed_steps(workdir)[-1]
  assert result["top1"] == result["reported_last_top1"]


@pytest.mark.parametrize("count", [0, 1, 7, 10])
def test_tfds_label_scan_is_split_over_processes(count):
  """Each of 3 processes reads its contiguous share once; the gathered result is in order."""
  from idat_jax.data.tfds_backend import assemble_shares, scan_share
  reads = []

  def read(i):
    reads.append(i)
    return 100 + i

  shares = np.stack([scan_share(count, read, p, 3) for p in range(3)])
  assert sorted(reads) == list(range(count))  # every record once, over all processes
  np.testing.assert_array_equal(assemble_shares(shares, count), 100 + np.arange(count))


def test_launcher_blames_the_first_non_abort_failure():
  """Peers of a dead JAX process abort (SIGABRT) right after it: they are not the cause."""
  first = launch._first_failure  # pylint: disable=protected-access
  assert first([(0.0, 0, 0), (1.0, 1, 0)]) is None
  assert first([(0.00, 0, -signal.SIGABRT), (0.05, 1, -signal.SIGKILL)]) == 1
  assert first([(0.0, 1, 1), (0.3, 0, -signal.SIGABRT)]) == 1
  assert first([(0.0, 0, -signal.SIGABRT), (2.0, 1, -signal.SIGKILL)]) == 0  # apart: order
  assert first([(0.0, 1, -signal.SIGABRT), (0.1, 0, -signal.SIGABRT)]) == 1


def test_launch_local_script_usage():
  proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "launch_local.sh")],
                        capture_output=True, text=True, timeout=30, check=False)
  assert proc.returncode == 2 and "usage" in proc.stderr
  assert launch.Result([0, 0]).exit_code == 0
  assert launch.Result([0, -9], failed=1).exit_code == 128 + 9
