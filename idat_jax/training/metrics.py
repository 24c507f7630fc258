"""Metric sinks written by process 0: JSONL, TensorBoard event files and a results CSV."""

from __future__ import annotations

import csv
import logging
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from idat_jax.fileio import atomic_write


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return value


class MetricWriter:
  """``metrics.jsonl`` (one JSON object per write) + TensorBoard (tensorboardX, no TF)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int = 0):
    """``resume_step``: the step the run (re)starts from. Rows logged after it by an earlier,
    interrupted segment are dropped (the resumed run logs those steps again, identically),
    so every step appears once; TensorBoard purges them the same way."""
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    dropped = drop_rows_after(path, resume_step)
    if dropped:
      logging.getLogger(__name__).info(
          "dropped %d rows of %s logged after step %d (the run resumes from there)", dropped,
          path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites a ``metrics.jsonl`` without its rows past ``step`` (atomically); their count.

  A torn last line (a kill mid-write) is dropped too.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if int(row.get("step", 0)) > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with atomic_write(path) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
  return dropped


# 'details': the method's own description of the run (Method.describe) beyond the task and
# tuning mode, as JSON (e.g. the probed backbone, or the distillation data).
# 'best'/'last' hold the method's evaluation metric named in 'metric' (top-1 %, or mean AUROC
# % of a multi-label probe); best_top1/last_top1 are filled for top-1 runs only.
RESULT_FIELDS = ("task", "method", "tuning", "seed", "metric", "best", "last", "best_epoch",
                 "best_top1", "last_top1", "trainable_params", "total_params", "epochs",
                 "wall_time_s", "workdir", "details")
_SUMMARY_ONLY = ("method", "seed", "metric", "best", "last", "best_top1", "best_epoch",
                 "last_top1",
                 "trainable_params", "total_params", "epochs", "wall_time_s", "workdir",
                 "finished", "step", "counts", "setup_s", "epoch_times", "resume_overrides",
                 "task", "tuning", "already_finished")


def append_result(path: str, row: Mapping[str, Any]) -> None:
  """Appends one run's summary to ``results.csv`` (header written once)."""
  if jax.process_index() != 0:
    return
  new = not os.path.exists(path)
  fields = RESULT_FIELDS
  if not new:  # a file an older version started keeps its columns
    with open(path, newline="", encoding="utf-8") as f:
      fields = tuple(next(csv.reader(f), None) or RESULT_FIELDS)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    if new:
      writer.writeheader()
    out = {k: _plain(row.get(k, "")) for k in RESULT_FIELDS if k != "details"}
    metric = row.get("metric", "top1")
    details = {k: _plain(v) for k, v in row.items() if k not in _SUMMARY_ONLY
               and k not in (f"best_{metric}", f"last_{metric}")
               and isinstance(v, (str, int, float, bool, type(None)))}
    out["details"] = json.dumps(details, sort_keys=True) if details else ""
    writer.writerow(out)


class _DropLibraryInfo(logging.Filter):
  """Drops INFO records from Orbax and friends, which log every save/restore in detail."""
  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}etils{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or not any(p in record.pathname for p in self.NOISY)


def quiet_library_logs() -> None:
  """Keeps our INFO logs readable; library warnings and errors still show."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
