"""What a work dir holds besides checkpoints: its lock, and the record of the config it ran.

* One process trains or evaluates a work dir at a time: :class:`WorkdirLock` holds an
  exclusive ``flock`` on ``<workdir>/.lock`` for the run's lifetime (process 0 only on
  multi-host runs). The kernel drops the lock when its holder dies, so a lock file left by a
  killed run is taken over (with a warning naming the dead pid); a live holder makes a second
  run fail at once, naming its pid and host. A run that ends (also by an error or Ctrl-C)
  removes the file.
* The config that decides a run's trajectory is stored with every checkpoint. A resume with a
  different one is refused with the list of changed keys, unless ``resume_changed=True`` says
  it is meant (the override is recorded in the checkpoint meta).
* ``config.json`` is the config of the fresh run; later invocations (resumes, ``mode=eval``)
  write ``config.<mode>.<timestamp>.json`` beside it, so the record of what trained is kept.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any, Mapping

import ml_collections
from absl import logging

from idat_jax import fileio
from idat_jax.errors import WorkdirError
from idat_jax.tree_util import flatten

LOCK_FILE = ".lock"

# Keys that control how a run is executed or reported, not what it computes: they may change
# between the segments of a resumed run. Everything else is compared on resume.
RUN_CONTROL_KEYS = (
    "mode", "resume_changed", "log_every_steps", "progress_bar", "eval_every_epochs",
    "checkpoint_every_epochs", "keep_checkpoints", "stop_after_steps",
    "compilation_cache_dir", "eval_batch_size", "num_devices", "eval/step",
    "data/cache_dir", "data/eval_resident_mb", "distributed", "distributed/.*", "tensorboard",
)


def _is_run_control(key: str) -> bool:
  for pattern in RUN_CONTROL_KEYS:
    if pattern.endswith("/.*"):
      if key.startswith(pattern[:-2]):
        return True
    elif key == pattern:
      return True
  return False


def _plain(value: Any) -> Any:
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return value


def trajectory_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{'optim/lr': 0.001, ...}``: the flat config keys that decide what a run computes."""
  flat = flatten(json.loads(config.to_json_best_effort()))
  return {k: _plain(v) for k, v in sorted(flat.items()) if not _is_run_control(k)}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """``['optim/lr: 0.001 -> 0.01', ...]`` for every key that differs (or exists on one side)."""
  missing = object()
  out = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, missing), current.get(key, missing)
    if old != new:
      fmt = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
      out.append(f"{key}: {fmt(old)} -> {fmt(new)}")
  return out


def write_config_record(config: ml_collections.ConfigDict, workdir: str, fresh: bool) -> str:
  """``config.json`` for a fresh run, else ``config.<mode>.<timestamp>.json``; its path."""
  fileio.makedirs(workdir)
  if fresh and not fileio.exists(os.path.join(workdir, "config.json")):
    name = "config.json"
  else:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"config.{config.mode}.{stamp}.json"
    n = 1
    while fileio.exists(os.path.join(workdir, name)):
      n += 1
      name = f"config.{config.mode}.{stamp}-{n}.json"
  path = os.path.join(workdir, name)
  fileio.write_text(path, config.to_json_best_effort(indent=2))
  return path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Exclusive lock on a local work dir for one run (see the module docstring).

  ``acquire`` raises :class:`WorkdirError` at once if another live process holds it. Remote
  (``gs://``) work dirs cannot be locked; a warning says so.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    if fileio.is_remote(self.workdir):
      logging.warning("work dir %s is remote: it is not locked; make sure no other run uses it",
                      self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = self._read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise WorkdirError(
              f"work dir {self.workdir} is in use by pid {holder.get('pid', '?')} on "
              f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to "
              "finish, stop it, or use another --workdir") from None
        raise
      # The holder removes the file on release (before unlocking): a lock taken on a file
      # that is no longer at self.path guards nothing, so it is taken again on the new one.
      if self._is_current(fd):
        break
      os.close(fd)
    previous = self._read_holder(fd)
    host = socket.gethostname()
    if previous.get("pid"):
      if previous.get("host") == host and not _pid_alive(int(previous["pid"])):
        logging.warning("taking over the lock of work dir %s left by pid %s on %s, which is no "
                        "longer running", self.workdir, previous["pid"], host)
      elif previous.get("host") != host:
        # flock is not shared across hosts on every file system: a record from another host
        # may be a live run. Refuse rather than risk two writers.
        os.close(fd)
        raise WorkdirError(
            f"work dir {self.workdir} is in use by pid {previous['pid']} on {previous['host']} "
            f"(since {previous.get('started', '?')}), or that run died without removing "
            f"{self.path}; if no run uses this work dir, delete that file and start again")
    record = json.dumps({"pid": os.getpid(), "host": host,
                         "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  @staticmethod
  def _read_holder(fd: int) -> dict[str, Any]:
    try:
      raw = os.pread(fd, 4096, 0)
      return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
      return {}

  def _is_current(self, fd: int) -> bool:
    try:
      mine, now = os.fstat(fd), os.stat(self.path)
    except FileNotFoundError:
      return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

  def release(self) -> None:
    """Removes the lock file (a clean exit leaves nothing behind), then unlocks."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
      try:
        os.unlink(self.path)  # while still locked: see acquire() for a waiting opener
      except FileNotFoundError:
        pass
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
