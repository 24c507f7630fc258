"""scripts/vtab_table.py: per-task means over seeds, group means, both overall means."""

import csv
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import vtab_table  # noqa: E402

from idat_jax.training.metrics import append_result  # noqa: E402


def _write_sweep(root, values, seeds=(42, 43), params=100_000):
  for task, value in values.items():
    for k, seed in enumerate(seeds):
      append_result(os.path.join(root, task, f"seed{seed}", "results.csv"),
                    dict(task=task, method="idat", seed=seed, best_top1=value + k,
                         last_top1=value + k - 1, trainable_params=params))


def test_table_means_and_outputs(tmp_path):
  tasks = [t for group in vtab_table.ORDER.values() for t in group]
  assert len(tasks) == 19
  values = {t: 50.0 + i for i, t in enumerate(tasks)}
  _write_sweep(tmp_path / "idat", values)
  _write_sweep(tmp_path / "partial", {t: 10.0 for t in tasks[:5]})
  out = tmp_path / "table"
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "vtab_table.py"),
                  str(tmp_path / "idat"), str(tmp_path / "partial"), "--out", str(out)],
                 check=True, capture_output=True)
  rows = list(csv.reader(open(f"{out}.csv")))
  header, full, partial = rows[0], rows[1], rows[2]
  by_col = dict(zip(header, full))
  # Seeds 42 and 43 give value and value + 1: the mean is value + 0.5.
  assert by_col["cifar100"] == f"{values['cifar'] + 0.5:.1f}"
  group_means = []
  for group, members in vtab_table.ORDER.items():
    expected = np.mean([values[t] + 0.5 for t in members])
    assert by_col[group] == f"{expected:.1f}"
    group_means.append(expected)
  assert by_col["mean (19 tasks)"] == f"{np.mean([v + 0.5 for v in values.values()]):.1f}"
  assert by_col["mean (3 groups)"] == f"{np.mean(group_means):.1f}"
  assert by_col["params (M)"] == "0.100"
  # An incomplete sweep shows how many tasks it has and no overall means.
  assert dict(zip(header, partial))["mean (19 tasks)"] == "(5/19)"
  assert os.path.getsize(f"{out}.png") > 1000
  assert open(f"{out}.md").read().startswith("| method |")


def test_last_metric_and_missing_sweep(tmp_path):
  _write_sweep(tmp_path / "s", {"dtd": 60.0})
  means, counts, _ = vtab_table.read_sweep(str(tmp_path / "s"), "last_top1")
  assert means == {"dtd": 59.5} and counts == {"dtd": 2}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "vtab_table.py"),
                         str(tmp_path / "nothing")], capture_output=True, text=True)
  assert proc.returncode != 0 and "no results.csv" in proc.stderr


def test_a_work_dir_listed_twice_counts_once(tmp_path):
  # An older version appended a second row when a finished command was run again.
  path = os.path.join(tmp_path, "s", "dtd", "seed42", "results.csv")
  for value in (60.0, 61.0):
    append_result(path, dict(task="dtd", method="idat", seed=42, best_top1=value,
                             last_top1=value, trainable_params=10, workdir="/runs/dtd/seed42"))
  append_result(os.path.join(tmp_path, "s", "dtd", "seed43", "results.csv"),
                dict(task="dtd", method="idat", seed=43, best_top1=50.0, last_top1=50.0,
                     trainable_params=10, workdir="/runs/dtd/seed43"))
  means, counts, _ = vtab_table.read_sweep(str(tmp_path / "s"), "best_top1")
  assert counts == {"dtd": 2} and means == {"dtd": 55.5}
