"""Paper-style VTAB-1K table from the ``results.csv`` files of one or more sweeps.

    python scripts/vtab_table.py runs/idat runs/adapter --out runs/table [--metric last]

Each positional argument is a sweep directory (as written by scripts/run_vtab.sh); its rows
are averaged over seeds per task. Prints Markdown, writes ``<out>.md``, ``<out>.csv`` and a
bar chart ``<out>.png`` (when matplotlib, the ``plots`` extra, is installed). The task columns
come from the registry, ``idat_jax.data.vtab``. Means: per group (Natural / Specialized /
Structured), the mean of the 19 tasks, and the mean of the three group means (papers use
either; both are shown). Tasks outside VTAB-1K (a user's folder tasks) get columns of their own
after the means, and count in none of them.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections import defaultdict

import numpy as np

from idat_jax.data import vtab

# Columns: the 19 tasks of the registry by group (Natural / Specialized / Structured).
ORDER = {group: list(vtab.tasks_in_group(group)) for group in vtab.GROUPS}
# Display names (the SSF/iDAT --dataset names where they are shorter).
SHORT = {"cifar": "cifar100", "oxford_flowers102": "flowers102", "oxford_iiit_pet": "pets",
         "patch_camelyon": "camelyon", "diabetic_retinopathy": "retinopathy"}


def result_value(row: dict[str, str], which: str, path: str) -> float:
  """A results.csv row's best or last evaluation, whatever its metric (top-1, mean AUROC).

  The trainer writes ``metric`` and its ``best``/``last`` values; files of older versions
  have only ``best_top1``/``last_top1`` (which held AUROC too).
  """
  for key in (which, f"{which}_{row.get('metric') or 'top1'}", f"{which}_top1"):
    if row.get(key) not in (None, ""):
      return float(row[key])
  raise ValueError(f"{path}: row of {row.get('workdir') or 'a run'} has no {which!r} value "
                   f"(metric {row.get('metric') or 'top1'!r}); was the run finished?")


def read_sweep(root: str, metric: str) -> tuple[dict[str, float], dict[str, int], float]:
  """Task -> mean metric over seeds, task -> number of seeds, mean trainable params (M)."""
  values: dict[str, list[float]] = defaultdict(list)
  params: list[float] = []
  files = sorted(glob.glob(os.path.join(root, "**", "results.csv"), recursive=True))
  if not files:
    raise FileNotFoundError(f"no results.csv under {root}")
  latest: dict[str, tuple[str, dict[str, str]]] = {}
  for path in files:
    with open(path, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        row["value"] = str(result_value(row, metric, path))
        # One run is one seed: a work dir listed twice (a finished command run again by an
        # older version) counts once, with its last row.
        run = os.path.abspath(row.get("workdir") or os.path.dirname(path))
        if run in latest:
          print(f"note: {run} has more than one result row; counting its last one")
        latest[run] = (path, row)
  for _, row in latest.values():
    values[row["task"]].append(float(row["value"]))
    params.append(float(row["trainable_params"]))
  means = {t: float(np.mean(v)) for t, v in values.items()}
  counts = {t: len(v) for t, v in values.items()}
  return means, counts, float(np.mean(params)) / 1e6 if params else float("nan")


def other_tasks(sweeps) -> list[str]:
  """Tasks of the sweeps that are not VTAB-1K tasks (a user's folder tasks): shown in their own
  columns after the 19, and left out of every mean."""
  vtab_tasks = {t for tasks in ORDER.values() for t in tasks}
  return sorted({t for means, _, _ in sweeps.values() for t in means} - vtab_tasks)


def table_rows(sweeps: dict[str, tuple[dict[str, float], dict[str, int], float]]):
  others = other_tasks(sweeps)
  header = ["method", "params (M)"]
  for group, tasks in ORDER.items():
    header += [SHORT.get(t, t) for t in tasks] + [group]
  header += ["mean (19 tasks)", "mean (3 groups)"] + others
  rows = []
  for label, (means, _, params) in sweeps.items():
    row: list = [label, f"{params:.3f}"]
    group_means = []
    all_vals = []
    for group, tasks in ORDER.items():
      vals = [means.get(t) for t in tasks]
      row += ["" if v is None else f"{v:.1f}" for v in vals]
      present = [v for v in vals if v is not None]
      all_vals += present
      gm = float(np.mean(present)) if len(present) == len(tasks) else None
      group_means.append(gm)
      row.append("" if gm is None else f"{gm:.1f}")
    complete = len(all_vals) == 19
    row.append(f"{np.mean(all_vals):.1f}" if complete else f"({len(all_vals)}/19)")
    row.append(f"{np.mean(group_means):.1f}" if complete else "")
    row += ["" if means.get(t) is None else f"{means[t]:.1f}" for t in others]
    rows.append(row)
  return header, rows


def to_markdown(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def pyplot_or_note(path: str):
  """matplotlib.pyplot (headless), or None with a note when the plots extra is missing."""
  try:
    import matplotlib
  except ImportError:
    print(f"note: matplotlib is not installed (pip install -e .[plots]); no chart {path}",
          file=sys.stderr)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def bar_chart(sweeps, path: str) -> None:
  plt = pyplot_or_note(path)
  if plt is None:
    return
  tasks = [t for group in ORDER.values() for t in group] + other_tasks(sweeps)
  fig, ax = plt.subplots(figsize=(16, 5))
  width = 0.8 / max(len(sweeps), 1)
  for i, (label, (means, _, _)) in enumerate(sweeps.items()):
    xs = np.arange(len(tasks)) + i * width
    ax.bar(xs, [means.get(t, 0.0) for t in tasks], width, label=label)
  ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
  ax.set_xticklabels([SHORT.get(t, t) for t in tasks], rotation=60, ha="right")
  ax.set_ylabel("top-1 (%)")
  ax.set_title("VTAB-1K")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweeps", nargs="+", help="sweep directories (label = directory name)")
  parser.add_argument("--metric", default="best", choices=["best", "last"],
                      help="each run's best or last evaluation (default best)")
  parser.add_argument("--out", default="vtab_table", help="output prefix (.md/.csv/.png)")
  args = parser.parse_args(argv)
  sweeps = {os.path.basename(os.path.normpath(s)): read_sweep(s, args.metric) for s in args.sweeps}
  header, rows = table_rows(sweeps)
  md = to_markdown(header, rows)
  print(md)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write(md + "\n")
  with open(args.out + ".csv", "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([header] + rows)
  bar_chart(sweeps, args.out + ".png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
