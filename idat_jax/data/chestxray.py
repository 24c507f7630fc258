"""NIH ChestX-ray14 in its official layout, as WeCoLoRA's ``CXRDataset`` reads it.

    <root>/Data_Entry_2017.csv  (or Data_Entry_2017_v2020.csv: 'Image Index', 'Finding Labels')
    <root>/train_val_list.txt   <root>/test_list.txt   (one file name per line)
    <root>/images*/**/<name>.png  (images_001/images/..., or images/...)

15 labels, in the reference's order, "No Finding" last; 'Finding Labels' is '|'-separated.
Splits: ``train`` (train_val_list) and ``test`` (test_list). As in the reference, an image
listed but absent from the image folders is not used, and an image on disk in neither list
is not used: both are counted in ``skipped`` and logged, never silently relabelled. An unknown
label name, a listed image without a CSV row, an empty label field, or an image listed in both
splits is an error naming the file.
"""

from __future__ import annotations

import csv
import glob
import io
import os

import numpy as np
from absl import logging

from idat_jax.data.base import DataError, DataNotPreparedError, read_text_file, walk_files
from idat_jax.data.multilabel_csv import MultiLabelSource

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
          "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
          "Pleural_Thickening", "Hernia", "No Finding")
SPLIT_LISTS = {"train": "train_val_list.txt", "train_val": "train_val_list.txt",
               "test": "test_list.txt"}
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def _read_list(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataNotPreparedError(f"ChestX-ray14 split list {path} not found (the NIH release has "
                               "train_val_list.txt and test_list.txt next to Data_Entry_2017.csv)")
  text = read_text_file(path, "a split list holds one image file name per line")
  return [line.strip() for line in text.splitlines() if line.strip()]


def _find_csv(root: str) -> str:
  for name in CSV_NAMES:
    if os.path.isfile(os.path.join(root, name)):
      return os.path.join(root, name)
  found = sorted(glob.glob(os.path.join(root, "Data_Entry_2017*.csv")))
  if not found:
    raise DataNotPreparedError(f"no Data_Entry_2017*.csv in {root} (the NIH ChestX-ray14 "
                               "metadata file with 'Image Index' and 'Finding Labels')")
  return found[0]


def read_findings(csv_path: str) -> dict[str, str]:
  """'Image Index' -> 'Finding Labels' of the NIH metadata CSV.

  UTF-8 with or without a byte-order mark (a CSV saved by Excel has one). A repeated row of an
  image is skipped (counted in the log) when its labels are the same, an error otherwise.
  """
  text = read_text_file(csv_path, "the NIH metadata CSV")
  reader = csv.DictReader(io.StringIO(text, newline=""))
  fields = reader.fieldnames or []
  if "Image Index" not in fields or "Finding Labels" not in fields:
    raise DataError(f"{csv_path}: expected the columns 'Image Index' and 'Finding Labels', "
                    f"got {fields[:4]}")
  out: dict[str, str] = {}
  lines: dict[str, int] = {}
  duplicates = 0
  for row in reader:
    line = reader.line_num
    name = (row["Image Index"] or "").strip()
    labels = (row["Finding Labels"] or "").strip()
    if name in out:
      if out[name] != labels:
        raise DataError(f"{csv_path}: image {name} has conflicting rows on lines {lines[name]} "
                        f"({out[name]!r}) and {line} ({labels!r}); keep one row per image")
      duplicates += 1
      continue
    out[name], lines[name] = labels, line
  if duplicates:
    logging.warning("%s: %d row(s) repeat an earlier row of the same image with the same "
                    "labels; they are skipped", csv_path, duplicates)
  return out


def multi_hot(findings: str, where: str) -> np.ndarray:
  """'Effusion|Mass' -> the 15-label 0/1 vector; unknown or empty labels are errors."""
  names = [n.strip() for n in findings.split("|") if n.strip()]
  if not names:
    raise DataError(f"{where}: empty 'Finding Labels' (use 'No Finding' for a normal image)")
  unknown = sorted(set(names) - set(LABELS))
  if unknown:
    raise DataError(f"{where}: unknown label(s) {unknown}; ChestX-ray14 labels are "
                    f"{', '.join(LABELS)}")
  if "No Finding" in names and len(names) > 1:
    raise DataError(f"{where}: 'No Finding' together with findings {names}")
  return np.asarray([name in names for name in LABELS], np.float32)


def find_images(root: str) -> dict[str, str]:
  """File name -> path of every PNG under ``<root>/images*/`` (any depth)."""
  found: dict[str, str] = {}
  for top in sorted(glob.glob(os.path.join(root, "images*"))):
    if not os.path.isdir(top):
      continue
    for rel in walk_files(top, lambda name: name.lower().endswith(".png")):
      name, path = os.path.basename(rel), os.path.join(top, rel)
      if name in found:
        raise DataError(f"ChestX-ray14 image {name} found twice: {found[name]} and {path}")
      found[name] = path
  if not found:
    raise DataNotPreparedError(f"no PNG images under {root}/images*/ (the NIH release unpacks "
                               "to images_001/images/*.png ... images_012/images/*.png)")
  return found


class ChestXray14Source(MultiLabelSource):
  """One split of ChestX-ray14 (module docstring); labels are packed 15-label masks."""

  def __init__(self, root: str, split: str = "train"):
    root = os.fspath(root)
    if split not in SPLIT_LISTS:
      raise DataError(f"ChestX-ray14 split {split!r} unknown; use one of {sorted(SPLIT_LISTS)}")
    if not os.path.isdir(root):
      raise DataNotPreparedError(f"ChestX-ray14 root {root} does not exist")
    csv_path = _find_csv(root)
    findings = read_findings(csv_path)
    listed = _read_list(os.path.join(root, SPLIT_LISTS[split]))
    other_name = SPLIT_LISTS["test" if SPLIT_LISTS[split] != "test_list.txt" else "train"]
    other = set(_read_list(os.path.join(root, other_name)))
    both = sorted(set(listed) & other)
    if both:
      raise DataError(f"{root}: {len(both)} image(s) are in both {SPLIT_LISTS[split]} and "
                      f"{other_name}, e.g. {both[:3]}: the splits must not overlap")
    images = find_images(root)
    paths, hots, missing = [], [], []
    for name in sorted(set(listed)):
      if name not in findings:
        raise DataError(f"{csv_path}: no row for image {name} listed in {SPLIT_LISTS[split]}")
      if name not in images:
        missing.append(name)
        continue
      paths.append(images[name])
      hots.append(multi_hot(findings[name], f"{csv_path} (image {name})"))
    unlisted = len(set(images) - set(listed) - other)
    self.skipped = {"missing_image": len(missing), "in_no_list": unlisted}
    if missing or unlisted:
      logging.warning("ChestX-ray14 %s: %d listed image(s) not found under images*/ (e.g. %s), "
                      "%d image(s) on disk in neither list; both are left out", split,
                      len(missing), missing[:3], unlisted)
    if not paths:
      raise DataError(f"ChestX-ray14 {split}: none of the {len(listed)} images of "
                      f"{SPLIT_LISTS[split]} is under {root}/images*/")
    self.root = root
    super().__init__(paths, np.stack(hots), LABELS, name=f"chestxray14:{root}:{split}",
                     cache_key=("chestxray14", os.path.basename(os.path.normpath(root)), split))
