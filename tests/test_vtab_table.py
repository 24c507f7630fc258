"""scripts/run_vtab.sh -> scripts/vtab_table.py on real (tiny) runs: two methods, two tasks.

The sweeps run the trainer through the script as a user does (TASKS restricts the tasks), on
digits written as folder tasks under two VTAB-1K task names, with tiny random-weight ViTs
saved as Google-format .npz files (no download). The table is then checked against what the
runs wrote.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import vtab_table  # noqa: E402

TASKS = ("dtd", "eurosat")  # a Natural and a Specialized column
STUDENT = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4)
TEACHER = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)


def _write_backbones(tmp_path) -> dict[str, str]:
  from idat_jax import checkpoints
  from idat_jax.models import build_vit
  from vit_testing import random_params
  paths = {}
  for name, arch, seed in (("student", STUDENT, 0), ("teacher", TEACHER, 1)):
    paths[name] = str(tmp_path / f"{name}.npz")
    checkpoints.save_npz(random_params(build_vit(None, 0, image_size=16, **arch), seed=seed),
                         paths[name])
  return paths


def _flags(data_root: str, backbones: dict[str, str], cache: str) -> list[str]:
  flags = [f"--config.data.root={data_root}", "--config.data.image_size=16",
           "--config.batch_size=50", "--config.eval_batch_size=500",
           "--config.optim.epochs=2", "--config.optim.warmup_epochs=1",
           "--config.optim.cooldown_epochs=0", "--config.optim.lr=1e-2",
           "--config.log_every_steps=100", "--config.tensorboard=False",
           f"--config.compilation_cache_dir={cache}", f"--config.data.cache_dir={cache}_data"]
  for model, arch in (("student", STUDENT), ("teacher", TEACHER)):
    flags += [f"--config.models.{model}.variant=custom",
              f"--config.models.{model}.checkpoint={backbones[model]}",
              f"--config.models.{model}.dtype=float32"]
    flags += [f"--config.models.{model}.{k}={v}" for k, v in arch.items()]
  return flags


def _run_vtab(sweep: str, method: str, flags: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHON=sys.executable, TASKS=" ".join(TASKS),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_vtab.sh"), sweep, method,
                         "42", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


def _summary(sweep: str, task: str) -> dict:
  workdir = os.path.join(sweep, task, "seed42")
  with open(os.path.join(workdir, "results.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  # The row and the summary are the same run.
  assert float(rows[0]["best"]) == pytest.approx(summary["best"], abs=1e-9)
  assert float(rows[0]["last"]) == pytest.approx(summary["last"], abs=1e-9)
  assert summary["metric"] == "top1" and summary["finished"]
  return summary


@pytest.mark.slow
def test_sweeps_of_two_methods_to_the_table(tmp_path):
  from idat_jax.data.digits import write_digits_task
  data = str(tmp_path / "data")
  for task in TASKS:  # digits 0-4 under both names (5 classes; same programs, compiled once)
    write_digits_task(data, name=task, classes=range(5), train_size=100, seed=0)
  flags = _flags(data, _write_backbones(tmp_path), str(tmp_path / "jax_cache"))
  sweeps = {m: str(tmp_path / m) for m in ("idat", "adapter")}
  for method, sweep in sweeps.items():
    proc = _run_vtab(sweep, method, flags)
    # TASKS restricts the sweep: only those tasks ran.
    assert sorted(os.listdir(sweep)) == sorted(TASKS), proc.stdout
  # Started again, the script skips the finished runs (no new result row, no training).
  proc = _run_vtab(sweeps["idat"], "idat", flags)
  assert [l for l in proc.stdout.splitlines() if l.startswith("skip")] == [
      f"skip {t} seed 42 (finished)" for t in TASKS]
  runs = {(m, t): _summary(sweeps[m], t) for m in sweeps for t in TASKS}

  out = str(tmp_path / "table")
  for metric in ("best", "last"):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "vtab_table.py"),
                    sweeps["idat"], sweeps["adapter"], "--out", f"{out}_{metric}",
                    "--metric", metric], check=True, capture_output=True, cwd=ROOT)
    with open(f"{out}_{metric}.csv", newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
    header = rows[0]
    by_method = {row[0]: dict(zip(header, row)) for row in rows[1:]}
    assert list(by_method) == ["idat", "adapter"]
    for method in sweeps:
      cells = by_method[method]
      for task in TASKS:  # each cell is the run's own number (one seed: its mean)
        assert cells[vtab_table.SHORT.get(task, task)] == f"{runs[method, task][metric]:.1f}"
      params = runs[method, TASKS[0]]["trainable_params"]
      assert cells["params (M)"] == f"{params / 1e6:.3f}"
      # Two of 19 tasks: no group means or overall means, and the count says why.
      assert cells["Natural"] == "" and cells["mean (19 tasks)"] == "(2/19)"
      assert cells["mean (3 groups)"] == ""
      assert cells["cifar100"] == ""  # a task that never ran is an empty cell
  # iDAT trains the teacher's adapters and head too: more trainable parameters.
  assert runs["idat", "dtd"]["trainable_params"] > runs["adapter", "dtd"]["trainable_params"]
  md = open(f"{out}_best.md", encoding="utf-8").read()
  assert md.startswith("| method | params (M) |") and "| idat |" in md and "| adapter |" in md


def test_legacy_rows_and_a_work_dir_listed_twice(tmp_path):
  # Files of older versions have only best_top1/last_top1, and one appended a second row when
  # a finished command was run again: the run counts once, with its last row.
  header = "task,method,seed,best_top1,last_top1,trainable_params,workdir\n"
  path = tmp_path / "s" / "dtd" / "seed42" / "results.csv"
  path.parent.mkdir(parents=True)
  path.write_text(header + "dtd,idat,42,60.0,59.0,10,/r/dtd/seed42\n"
                  "dtd,idat,42,61.0,60.0,10,/r/dtd/seed42\n")
  other = tmp_path / "s" / "dtd" / "seed43" / "results.csv"
  other.parent.mkdir(parents=True)
  other.write_text(header + "dtd,idat,43,50.0,49.0,10,/r/dtd/seed43\n")
  means, counts, _ = vtab_table.read_sweep(str(tmp_path / "s"), "best")
  assert counts == {"dtd": 2} and means == {"dtd": 55.5}
  assert vtab_table.read_sweep(str(tmp_path / "s"), "last")[0] == {"dtd": 54.5}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "vtab_table.py"),
                         str(tmp_path / "nothing")], capture_output=True, text=True)
  assert proc.returncode != 0 and "no results.csv" in proc.stderr
