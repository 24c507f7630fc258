#!/usr/bin/env python3
"""Prepare, verify and export the 19 VTAB-1K tasks (task_adaptation's exact definition).

  # Prepare with TFDS (needs TensorFlow: pip install -e .[tfds-prepare]); array_record output
  # is then readable without TensorFlow.
  python scripts/prepare_vtab.py --tasks all --data_dir ~/tensorflow_datasets
  # Only check what is on disk: split sizes 800/200/1000/test size, label histogram, classes.
  python scripts/prepare_vtab.py --tasks dtd,kitti --skip_prepare
  # Also write the NOAH/SSF folder layout <root>/<task>/images/<split>/NNNNNN.jpg + <split>.txt.
  python scripts/prepare_vtab.py --tasks dtd --skip_prepare --export_folder ~/vtab-1k
  # Manual-download steps (diabetic_retinopathy, resisc45).
  python scripts/prepare_vtab.py --instructions

Exit status: 0 when every selected task was prepared and verified, 1 when a task failed
(the others are still processed), 2 for unusable arguments or a missing TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Sequence

TF_MISSING = (
    "Preparing VTAB data sets with TFDS needs TensorFlow, which is not installed.\n"
    "Install the optional extra:  pip install -e .[tfds-prepare]\n"
    "(Reading prepared array_record data, --skip_prepare verification and --export_folder "
    "do not need TensorFlow.)")


def _import_data():
  """Imports idat_jax.data, from this checkout when the package is not installed."""
  try:
    from idat_jax import data  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from idat_jax import data  # pylint: disable=g-import-not-at-top
  return data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__,
      epilog="Task names are the NOAH/SSF folder names (caltech101, cifar, dtd, "
             "oxford_flowers102, oxford_iiit_pet, svhn, sun397, patch_camelyon, eurosat, "
             "resisc45, diabetic_retinopathy, clevr_count, clevr_dist, dmlab, kitti, "
             "dsprites_loc, dsprites_ori, smallnorb_azi, smallnorb_ele) or the aliases "
             "cifar100, flowers102, pets; groups: natural, specialized, structured.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tasks", default="all",
                      help="comma-separated tasks or groups, or 'all' (default)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None,
                      help="manual downloads (default: <data_dir>/downloads/manual)")
  parser.add_argument("--file_format", default="array_record",
                      choices=("array_record", "tfrecord"),
                      help="TFDS file format; array_record is readable without TensorFlow")
  parser.add_argument("--skip_prepare", action="store_true",
                      help="do not run TFDS download_and_prepare (verify/export only)")
  parser.add_argument("--no_verify", action="store_true", help="skip the verification")
  parser.add_argument("--export_folder", default=None,
                      help="also export the NOAH/SSF folder layout under this root")
  parser.add_argument("--jpeg_quality", type=int, default=75,
                      help="JPEG quality of exported images (75 = PIL default, as NOAH)")
  parser.add_argument("--overwrite_export", action="store_true",
                      help="rewrite exported splits that already look complete")
  parser.add_argument("--instructions", action="store_true",
                      help="print the manual-download instructions and exit")
  return parser.parse_args(argv)


def select_tasks(spec: str, data) -> list[str]:
  """Task folder names from 'all', group names, task names and aliases (deduplicated)."""
  groups = {g.lower(): g for g in data.GROUPS}
  selected: list[str] = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    if item.lower() == "all":
      names = list(data.VTAB_TASKS)
    elif item.lower() in groups:
      names = list(data.tasks_in_group(groups[item.lower()]))
    else:
      name = data.canonical_name(item)
      if not data.get_task(name).has_tfds:
        raise data.DataError(f"task {name!r} has no TFDS source (it is written by "
                             "idat_jax.data.write_digits_task)")
      names = [name]
    selected.extend(n for n in names if n not in selected)
  return selected


def print_instructions(tasks: Sequence[str], data, data_dir: str, manual_dir: str) -> None:
  manual = [t for t in tasks if data.get_task(t).manual_download]
  if not manual:
    print("None of the selected tasks needs a manual download.")
  for task in manual:
    text = data.get_task(task).manual_download.replace("<data_dir>/downloads/manual/",
                                                         manual_dir.rstrip("/") + "/")
    print(f"[{task}] {text}\n")


def prepare_task(task: str, data, data_dir: str, manual_dir: str, file_format: str) -> str:
  """Runs TFDS download_and_prepare for a task's data set; returns the prepared version."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = data.get_task(task)
  errors = []
  for version in spec.tfds_versions:
    try:
      builder = tfds.builder(f"{spec.tfds_name}:{version}", data_dir=data_dir,
                             file_format=file_format)
    except Exception as e:  # version no longer in this TFDS: try the fallback
      errors.append(f"{version}: {e}")
      continue
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.info.version)
  raise data.DataError(f"no loadable version of {spec.tfds_name} for task {task}: "
                       + "; ".join(errors))


def verify_task(task: str, data, data_dir: str | None) -> dict[str, dict]:
  """Per split: size (and expected), label histogram, classes seen, ok flag."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  spec = data.get_task(task)
  report = {}
  for split in data.SPLITS:
    source = data.TfdsTaskSource(task, split, data_dir)
    labels = source.labels()
    hist = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    expected = spec.split_size(split)
    ok = len(source) == expected and len(labels) == len(source)
    report[split] = {"size": len(source), "expected": expected, "histogram": hist,
                     "classes_seen": len(hist), "version": source.version, "ok": ok}
  return report


def format_report(task: str, num_classes: int, report: dict[str, dict]) -> str:
  lines = []
  for split, r in report.items():
    status = "ok" if r["ok"] else f"MISMATCH (expected {r['expected']})"
    hist = " ".join(f"{k}:{v}" for k, v in sorted(r["histogram"].items()))
    lines.append(f"  {task:22s} {split:15s} {r['size']:7d} examples {status}; "
                 f"{r['classes_seen']}/{num_classes} classes seen; labels {hist}")
  return "\n".join(lines)


def export_task(task: str, data, data_dir: str | None, root: str, quality: int,
                overwrite: bool = False) -> dict[str, int]:
  """Writes <root>/<task>/images/<split>/NNNNNN.jpg and <split>.txt (NOAH's get_vtab1k.py)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  task_dir = os.path.join(root, task)
  counts = {}
  for split in data.SPLITS:
    source = data.TfdsTaskSource(task, split, data_dir)
    list_file = os.path.join(task_dir, f"{split}.txt")
    if not overwrite and os.path.isfile(list_file):
      with open(list_file, encoding="utf-8") as f:
        if sum(1 for line in f if line.strip()) == len(source):
          counts[split] = len(source)
          continue
    image_dir = os.path.join(task_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)

    def write(i: int, source=source, split=split, image_dir=image_dir) -> str:
      image, label = source.get(i)
      rel = f"images/{split}/{i:06d}.jpg"
      Image.fromarray(image, "RGB").save(os.path.join(image_dir, f"{i:06d}.jpg"),
                                         quality=quality)
      return f"{rel} {label}"

    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
      lines = list(pool.map(write, range(len(source))))
    tmp = list_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(tmp, list_file)  # the list file appears only once all its images exist
    counts[split] = len(lines)
  return counts


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  data = _import_data()
  from idat_jax.data import tfds_backend  # pylint: disable=g-import-not-at-top
  data_dir = tfds_backend.resolve_data_dir(args.data_dir)
  manual_dir = args.manual_dir or os.path.join(data_dir, "downloads", "manual")
  try:
    tasks = select_tasks(args.tasks, data)
  except data.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.instructions:
    print_instructions(tasks, data, data_dir, manual_dir)
    return 0
  if not args.skip_prepare and importlib.util.find_spec("tensorflow") is None:
    print(TF_MISSING, file=sys.stderr)
    return 2

  failed: list[str] = []
  prepared: set[tuple[str, tuple[str, ...]]] = set()
  for task in tasks:
    spec = data.get_task(task)
    try:
      if not args.skip_prepare:
        key = (spec.tfds_name, spec.tfds_versions)
        if key not in prepared:
          if spec.manual_download:
            print(f"[{task}] manual download: {spec.manual_download}")
          version = prepare_task(task, data, data_dir, manual_dir, args.file_format)
          print(f"[{task}] prepared {spec.tfds_name}:{version} in {data_dir}")
          prepared.add(key)
      if not args.no_verify:
        report = verify_task(task, data, data_dir)
        print(format_report(task, spec.num_classes, report))
        if not all(r["ok"] for r in report.values()):
          failed.append(task)
      if args.export_folder:
        counts = export_task(task, data, data_dir, args.export_folder, args.jpeg_quality,
                             args.overwrite_export)
        print(f"[{task}] exported to {os.path.join(args.export_folder, task)}: "
              + ", ".join(f"{s}={n}" for s, n in counts.items()))
    except Exception as e:  # report and go on with the other tasks
      print(f"[{task}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
      if spec.manual_download:
        print(f"[{task}] {spec.manual_download}", file=sys.stderr)
      failed.append(task)
  if failed:
    print(f"failed tasks: {', '.join(dict.fromkeys(failed))}", file=sys.stderr)
    return 1
  print(f"all {len(tasks)} tasks ok")
  return 0


if __name__ == "__main__":
  sys.exit(main())
