"""The two WeCoLoRA tables of the seed README from the runs of scripts/run_wecolora.sh.

    python scripts/wecolora_table.py runs/wecolora --out runs/wecolora/table [--metric last]

Reads ``<sweep>/probe/<teacher>/<variant>-r<r>-a<alpha>/<dataset>/results.csv`` (layout in
scripts/run_wecolora.sh) and prints, as Markdown:

1. the ablation (SSL teacher, r = 2): alpha in {1%, 10%} x {no copy, WeCo+KD, WeCo + LoRA,
   WeCo + enhanced LoRA} on ImageNet, iNaturalist and CIFAR-100 (top-1 %);
2. WeCo+KD vs WeCoLoRA, supervised and SSL teachers, r in {2, 3}, alpha = 1%, on ImageNet,
   ChestX-ray14 (mean AUROC %), iNaturalist, RESISC45 and CIFAR-100 (top-1 %);

plus, when present, the copied students without distillation. The best value of each
comparison group is bold, as in the paper; a missing run leaves an empty cell. Writes
``<out>.md``, ``<out>.csv`` (one row per table cell, with its run directory) and a bar chart
``<out>.png`` (matplotlib, imported only for the chart).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any

from vtab_table import pyplot_or_note, result_value, to_markdown  # scripts/ (this script's folder)

DATASET_NAMES = {"imagenet": "ImageNet", "chestxray": "ChestX-ray14", "inat19": "iNaturalist",
                 "resisc45": "RESISC45", "cifar100": "CIFAR-100"}
TABLE1_DATASETS = ("imagenet", "inat19", "cifar100")
TABLE2_DATASETS = ("imagenet", "chestxray", "inat19", "resisc45", "cifar100")
# variant -> (weight copy, LoRA, enhanced LoRA) marks of table 1
ABLATION = {"no_copy": ("✗", "✗", "✗"), "weco_kd": ("✓", "✗", "✗"),
            "lora_plain": ("✓", "✓", "✗"), "lora": ("✓", "✗", "✓")}
METHOD_NAMES = {"weco_kd": "WeCo+KD", "lora": "WeCoLoRA"}
TEACHER_NAMES = {"sup": "ViT-B (supervised)", "ssl": "ViT-B (SSL)"}
ALPHAS = ("0.01", "0.1")


def run_value(run_dir: str, which: str) -> float | None:
  """The best or last evaluation metric of a finished run (its results.csv's last row)."""
  path = os.path.join(run_dir, "results.csv")
  if not os.path.isfile(path):
    return None
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return None
  return result_value(rows[-1], which, path)


def collect(sweep: str, which: str) -> dict[tuple, dict[str, Any]]:
  """(teacher, variant, r, alpha, dataset) -> {'value', 'run'} for every finished probe."""
  out = {}
  probe_root = os.path.join(sweep, "probe")
  if not os.path.isdir(probe_root):
    raise FileNotFoundError(f"no probe runs under {probe_root} (run scripts/run_wecolora.sh)")
  for teacher in sorted(os.listdir(probe_root)):
    for name in sorted(os.listdir(os.path.join(probe_root, teacher))):
      variant, r, alpha = parse_run_name(name)
      if variant is None:
        continue
      for dataset in sorted(os.listdir(os.path.join(probe_root, teacher, name))):
        run = os.path.join(probe_root, teacher, name, dataset)
        value = run_value(run, which)
        if value is not None:
          out[(teacher, variant, r, alpha, dataset)] = {"value": value, "run": run}
  return out


def parse_run_name(name: str) -> tuple[str | None, int | None, str | None]:
  """'lora-r2-a0.01' -> ('lora', 2, '0.01'); 'copied-r3' -> ('copied', 3, ''); else Nones."""
  parts = name.split("-")
  try:
    if parts[0] == "copied" and len(parts) == 2 and parts[1].startswith("r"):
      return "copied", int(parts[1][1:]), ""
    if len(parts) == 3 and parts[1].startswith("r") and parts[2].startswith("a"):
      return parts[0], int(parts[1][1:]), parts[2][1:]
  except ValueError:
    pass
  return None, None, None


def _fmt(cell) -> str:
  return "" if cell is None else f"{cell['value']:.1f}"


def _bold_best(rows: list[list[str]], cells: list[list[Any]], first_col: int) -> None:
  """Bold the highest value of each column among ``rows`` (one comparison group)."""
  for j in range(first_col, len(rows[0])):
    values = [c[j - first_col]["value"] for c in cells if c[j - first_col] is not None]
    if len(values) < 2:
      continue
    best = max(values)
    for row, c in zip(rows, cells):
      if c[j - first_col] is not None and c[j - first_col]["value"] == best:
        row[j] = f"**{row[j]}**"


def table1(results) -> tuple[list[str], list[list[str]], list[tuple]]:
  header = ["α", "Weight Copy", "LoRA", "Enhanced LoRA"] + [DATASET_NAMES[d]
                                                           for d in TABLE1_DATASETS]
  rows, keys = [], []
  for alpha in ALPHAS:
    group_rows, group_cells = [], []
    for i, (variant, marks) in enumerate(ABLATION.items()):
      cells = [results.get(("ssl", variant, 2, alpha, d)) for d in TABLE1_DATASETS]
      label = f"α={float(alpha) * 100:g}%" if i == 0 else ""
      group_rows.append([label, *marks] + [_fmt(c) for c in cells])
      group_cells.append(cells)
      keys += [("ssl", variant, 2, alpha, d) for d in TABLE1_DATASETS]
    _bold_best(group_rows, group_cells, 4)
    rows += group_rows
  return header, rows, keys


def table2(results) -> tuple[list[str], list[list[str]], list[tuple]]:
  header = ["Teacher", "r", "Distillation method"] + [DATASET_NAMES[d] for d in TABLE2_DATASETS]
  rows, keys = [], []
  for teacher in ("sup", "ssl"):
    for r in (2, 3):
      group_rows, group_cells = [], []
      for i, variant in enumerate(("weco_kd", "lora")):
        cells = [results.get((teacher, variant, r, "0.01", d)) for d in TABLE2_DATASETS]
        group_rows.append([TEACHER_NAMES[teacher] if r == 2 and i == 0 else "",
                           str(r) if i == 0 else "", METHOD_NAMES[variant]]
                          + [_fmt(c) for c in cells])
        group_cells.append(cells)
        keys += [(teacher, variant, r, "0.01", d) for d in TABLE2_DATASETS]
      _bold_best(group_rows, group_cells, 3)
      rows += group_rows
  return header, rows, keys


def copied_table(results) -> tuple[list[str], list[list[str]], list[tuple]]:
  header = ["Teacher", "r"] + [DATASET_NAMES[d] for d in TABLE2_DATASETS]
  rows, keys = [], []
  for teacher in ("sup", "ssl"):
    for r in (2, 3):
      cells = [results.get((teacher, "copied", r, "", d)) for d in TABLE2_DATASETS]
      if any(c is not None for c in cells):
        rows.append([TEACHER_NAMES[teacher], str(r)] + [_fmt(c) for c in cells])
        keys += [(teacher, "copied", r, "", d) for d in TABLE2_DATASETS]
  return header, rows, keys


def bar_chart(results, path: str) -> bool:
  """Grouped bars of both tables; False (and a note) when matplotlib is missing."""
  plt = pyplot_or_note(path)
  if plt is None:
    return False
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
  series1 = [(f"α={float(a) * 100:g}% {v}", [("ssl", v, 2, a, d) for d in TABLE1_DATASETS])
             for a in ALPHAS for v in ABLATION]
  series2 = [(f"{t} r={r} {METHOD_NAMES[v]}", [(t, v, r, "0.01", d) for d in TABLE2_DATASETS])
             for t in ("sup", "ssl") for r in (2, 3) for v in ("weco_kd", "lora")]
  for ax, series, datasets, title in (
      (axes[0], series1, TABLE1_DATASETS, "Ablation (SSL teacher, r=2)"),
      (axes[1], series2, TABLE2_DATASETS, "WeCo+KD vs WeCoLoRA (α=1%)")):
    width = 0.8 / len(series)
    for i, (label, keys) in enumerate(series):
      values = [results[k]["value"] if k in results else 0.0 for k in keys]
      ax.bar(np.arange(len(datasets)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2)
    ax.set_xticklabels([DATASET_NAMES[d] for d in datasets])
    ax.set_ylabel("top-1 % (ChestX-ray14: mean AUROC %)")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweep", help="the OUT directory of scripts/run_wecolora.sh")
  parser.add_argument("--metric", default="best", choices=["best", "last"],
                      help="each probe's best or last evaluation (default best)")
  parser.add_argument("--out", default="wecolora_table", help="output prefix (.md/.csv/.png)")
  args = parser.parse_args(argv)
  results = collect(args.sweep, args.metric)
  parts, cells = [], []
  titles = ("Ablation: SSL teacher ViT-B, r = 2, accuracy (%)",
            "WeCo+KD and WeCoLoRA, α = 1%: accuracy (%), ChestX-ray14 mean AUROC (%)",
            "Copied students without distillation (reference point)")
  for title, (header, rows, keys) in zip(titles, (table1(results), table2(results),
                                                  copied_table(results))):
    if not rows:
      continue
    parts.append(f"**{title}**\n\n{to_markdown(header, rows)}")
    for key in keys:
      teacher, variant, r, alpha, dataset = key
      hit = results.get(key)
      cells.append([title.split(":")[0], teacher, variant, r, alpha, dataset,
                    "" if hit is None else f"{hit['value']:.4f}",
                    "" if hit is None else hit["run"]])
  md = "\n\n".join(parts)
  print(md)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write(md + "\n")
  with open(args.out + ".csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["table", "teacher", "variant", "r", "alpha", "dataset", args.metric, "run"])
    writer.writerows(cells)
  bar_chart(results, args.out + ".png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
