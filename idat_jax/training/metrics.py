"""Metric sinks written by process 0: JSONL, TensorBoard event files and a results CSV.

A local ``metrics.jsonl`` is appended to and flushed row by row. A remote (gs://) one cannot be
appended to: its rows are kept in memory and the whole file is uploaded at most every
``REMOTE_UPLOAD_S`` seconds, at every :meth:`MetricWriter.sync` (the trainer calls it before
each checkpoint, so a resumed run never misses a row) and on close.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np

from idat_jax import fileio
from idat_jax.errors import WorkdirError

REMOTE_UPLOAD_S = 60.0


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return value


def json_safe(value: Any) -> Any:
  """``value`` with NumPy scalars/arrays as Python values and non-finite floats as ``None``,
  so the JSON written is standard (a bare ``NaN`` is not JSON; an undefined AUROC is null)."""
  value = _plain(value)
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def to_json(value: Any, **kwargs) -> str:
  """Standard JSON of a summary or metrics row (see :func:`json_safe`)."""
  return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


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
    fileio.makedirs(workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    dropped = drop_rows_after(path, resume_step)
    if dropped:
      logging.getLogger(__name__).info(
          "dropped %d rows of %s logged after step %d (the run resumes from there)", dropped,
          path, resume_step)
    if fileio.is_remote(path):
      self._jsonl = _RemoteLines(path)
    else:
      self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      logdir = os.path.join(workdir, "tensorboard")
      if fileio.is_remote(logdir):
        _check_remote_tensorboard(logdir)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = json_safe({"step": int(step), **metrics})
    try:
      self._jsonl.write(to_json(row) + "\n")
      self._jsonl.flush()
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise WorkdirError(f"no space left on device while writing metrics (step {step}) to "
                           f"{self._jsonl.name}; free space and run the same command again "
                           "to resume from the last complete checkpoint") from e
      raise
    if self._tb is not None:
      self._check_tensorboard(step)
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)

  def _check_tensorboard(self, step: int) -> None:
    """tensorboardX writes from a thread; if that thread died (a full disk), ``add_scalar``
    would block forever on its bounded queue. Stop with an error instead of hanging."""
    event_writer = getattr(getattr(self._tb, "file_writer", None), "event_writer", None)
    worker = getattr(event_writer, "_worker", None)
    if worker is not None and not worker.is_alive() and not event_writer._closed:  # noqa: SLF001
      logdir = event_writer.get_logdir()
      self._tb = None  # closing it would block the same way
      raise WorkdirError(f"the TensorBoard writer of {logdir} stopped at step {step} (no space "
                         "left on device?); free space and run the same command again to "
                         "resume from the last complete checkpoint")

  def sync(self) -> None:
    """Makes every row written so far durable (uploads a remote ``metrics.jsonl``)."""
    if isinstance(self._jsonl, _RemoteLines):
      self._jsonl.upload()

  def close(self) -> None:
    """Closes both sinks. A failed final flush (a full disk) is logged, not raised: close runs
    while another error (e.g. the failed checkpoint write) is being reported."""
    for name in ("_jsonl", "_tb"):
      sink = getattr(self, name)
      setattr(self, name, None)
      if sink is None:
        continue
      _close_with_timeout(sink, name.strip("_"))


class _RemoteLines:
  """The file-like ``metrics.jsonl`` of a remote work dir (see the module docstring)."""

  def __init__(self, path: str):
    self.name = path
    self._buffer = io.StringIO()
    if fileio.exists(path):  # the rows kept from earlier segments (see drop_rows_after)
      self._buffer.write(fileio.read_text(path))
    self._uploaded = time.monotonic()

  def write(self, text: str) -> None:
    self._buffer.write(text)

  def flush(self) -> None:
    if time.monotonic() - self._uploaded >= REMOTE_UPLOAD_S:
      self.upload()

  def upload(self) -> None:
    fileio.write_text(self.name, self._buffer.getvalue())
    self._uploaded = time.monotonic()

  def close(self) -> None:
    self.upload()


def _check_remote_tensorboard(logdir: str) -> None:
  """tensorboardX writes gs:// event files with google-cloud-storage; without it the run would
  fail at the first scalar, deep in a writer thread."""
  try:
    import google.cloud.storage  # noqa: F401
  except ImportError:
    raise WorkdirError(
        f"TensorBoard event files for {logdir} need google-cloud-storage (pip install "
        "google-cloud-storage), or run with --config.tensorboard=False (metrics.jsonl is "
        "written either way)") from None


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites a ``metrics.jsonl`` without its rows past ``step`` (atomically); their count.

  A torn last line (a kill mid-write) is dropped too.
  """
  if not fileio.exists(path):
    return 0
  kept, dropped = [], 0
  with fileio.open_file(path, encoding="utf-8") as f:
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
    fileio.write_text(path, "".join(kept))
  return dropped


# 'details': the method's own description of the run (Method.describe) beyond the task and
# tuning mode, as JSON (e.g. the probed backbone, or the distillation data).
# 'best'/'last' hold the method's evaluation metric named in 'metric' (top-1 %, or mean AUROC
# % of a multi-label probe); best_top1/last_top1 are filled for top-1 runs only.
def _close_with_timeout(sink: Any, what: str, timeout_s: float = 30.0) -> None:
  """Closes a writer, logging (not raising) a failure; gives up after ``timeout_s``.

  tensorboardX writes from a background thread; when that thread died (e.g. on a full disk),
  its ``close`` waits forever for a queue nobody drains. A run must end with its own error
  message instead of hanging.
  """
  errors: list[BaseException] = []

  def close():
    try:
      sink.close()
    except Exception as e:  # noqa: BLE001  (reported below)
      errors.append(e)

  thread = threading.Thread(target=close, name=f"close-{what}", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    logging.getLogger(__name__).warning("the %s metric writer did not close within %.0f s "
                                        "(its writer thread failed?); giving up", what, timeout_s)
  elif errors:
    logging.getLogger(__name__).warning("could not close the %s metric writer: %s", what,
                                        errors[0])


RESULT_FIELDS = ("task", "method", "tuning", "seed", "metric", "best", "last", "best_epoch",
                 "best_top1", "last_top1", "trainable_params", "total_params", "epochs",
                 "wall_time_s", "workdir", "run_id", "details")
_SUMMARY_ONLY = ("method", "seed", "metric", "best", "last", "best_top1", "best_epoch",
                 "last_top1",
                 "trainable_params", "total_params", "epochs", "wall_time_s", "workdir",
                 "finished", "step", "counts", "setup_s", "epoch_times", "resume_overrides",
                 "task", "tuning", "already_finished")


def has_result(path: str, run_id: str | None) -> bool:
  """Whether ``results.csv`` already holds the row of run ``run_id`` (its own column, or the
  details of a file whose header predates that column)."""
  if not run_id or not fileio.exists(path):
    return False
  for row in csv.DictReader(io.StringIO(fileio.read_text(path, newline=""))):
    if row.get("run_id") == run_id:
      return True
    try:
      if json.loads(row.get("details") or "{}").get("run_id") == run_id:
        return True
    except (ValueError, AttributeError):
      continue
  return False


def append_result(path: str, row: Mapping[str, Any]) -> None:
  """Appends one run's summary to ``results.csv`` (header written once).

  The file is rewritten whole, atomically (object stores cannot append; a reader never sees a
  torn row). One run writes it, under the work-dir lock.
  """
  if jax.process_index() != 0:
    return
  existing = fileio.read_text(path, newline="") if fileio.exists(path) else ""
  fields = RESULT_FIELDS
  if existing:  # a file an older version started keeps its columns
    fields = tuple(next(csv.reader(io.StringIO(existing)), None) or RESULT_FIELDS)
  if existing and not existing.endswith("\n"):
    existing += "\r\n"
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
  if not existing:
    writer.writeheader()
  out = {k: json_safe(row.get(k, "")) for k in RESULT_FIELDS if k != "details"}
  metric = row.get("metric", "top1")
  details = {k: _plain(v) for k, v in row.items() if k not in _SUMMARY_ONLY
             and k not in (f"best_{metric}", f"last_{metric}")
             and isinstance(v, (str, int, float, bool, type(None)))}
  if "run_id" in fields:  # else (a file an older version started) the id rides in details
    details.pop("run_id", None)
  out["details"] = to_json(details, sort_keys=True) if details else ""
  writer.writerow(out)
  with fileio.atomic_write(path) as tmp:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      f.write(existing + text.getvalue())


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
