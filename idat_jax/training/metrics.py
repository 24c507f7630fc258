"""Metric sinks written by process 0: JSONL, TensorBoard event files and a results CSV."""

from __future__ import annotations

import csv
import logging
import json
import os
from typing import Any, Mapping

import jax
import numpy as np


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return value


class MetricWriter:
  """``metrics.jsonl`` (one JSON object per write) + TensorBoard (tensorboardX, no TF)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


RESULT_FIELDS = ("task", "method", "tuning", "seed", "best_top1", "best_epoch", "last_top1",
                 "trainable_params", "total_params", "epochs", "wall_time_s", "workdir")


def append_result(path: str, row: Mapping[str, Any]) -> None:
  """Appends one run's summary to ``results.csv`` (header written once)."""
  if jax.process_index() != 0:
    return
  new = not os.path.exists(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="raise")
    if new:
      writer.writeheader()
    writer.writerow({k: _plain(row.get(k, "")) for k in RESULT_FIELDS})


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
