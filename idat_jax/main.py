"""Entry point: ``python -m idat_jax.main --config configs/idat_vtab.py:task=dtd --workdir runs/dtd``.

``config.mode=train`` trains (resuming from the work dir), ``config.mode=eval`` restores the
latest (or ``config.eval.step``) checkpoint and evaluates it.

Errors a user can cause (bad config, data, checkpoint or work dir; ``idat_jax.errors``) are
printed as one line, ``error: <message>``, with exit code 1; the full traceback goes to
``<workdir>/logs/error-<time>.log``, or to stderr with ``--verbosity=1``. Ctrl-C prints one
line (the step reached, the checkpoint kept) and exits with 130; the same command resumes.

At the end, process 0 prints a few readable lines (``training/report.py``; a synthetic-data
speed check adds its per-epoch times and the full protocol's estimate), or with ``--json`` the
summary as one JSON line, for scripts. ``<workdir>/summary.json`` holds every detail.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import tempfile
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from idat_jax.errors import IdatError, RunInterrupted

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg' (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, results).")
_JSON = flags.DEFINE_bool(
    "json", False, "Print the summary (or mode=eval's result) as one JSON line on stdout, for "
    "scripts, instead of the readable lines.")
flags.mark_flags_as_required(["config", "workdir"])

_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception))\s*:\s*(.*)$")


def _one_line(text: str) -> str:
  return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _traceback_file(workdir: str | None) -> str:
  """Where the full traceback of a failed run goes (the work dir, else the temp dir)."""
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  if workdir and "://" not in workdir:
    try:
      # One file per process on multi-host runs (they share the work dir).
      sharding = sys.modules.get("idat_jax.sharding")  # not imported by --helpfull
      tag = sharding.process_tag() if sharding is not None else ""
      path = os.path.join(workdir, "logs", f"error-{stamp}{tag}.log")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "a", encoding="utf-8"):
        pass
      return path
    except OSError:
      pass
  return os.path.join(tempfile.gettempdir(), f"idat_jax-error-{stamp}-{os.getpid()}.log")


def fail(message: str, workdir: str | None = None, verbose: bool = False) -> None:
  """Prints ``error: <message>`` (+ where the traceback is) and exits with status 1."""
  detail = traceback.format_exc()
  where = ""
  if detail and not detail.startswith("NoneType: None"):
    if verbose:
      sys.stderr.write(detail)
    else:
      where = "(--verbosity=1 prints the traceback)"
      # The work dir first; the temp dir when it cannot be written (e.g. a full disk).
      for path in dict.fromkeys((_traceback_file(workdir), _traceback_file(None))):
        try:
          with open(path, "w", encoding="utf-8") as f:
            f.write(detail)
        except OSError:
          continue
        where = f"(traceback: {path}; --verbosity=1 prints it)"
        break
  report = f"\nerror: {_one_line(message)}\n" + (where + "\n" if where else "")
  _exit_with(report, 1)


def interrupted(error: KeyboardInterrupt, workdir: str | None) -> None:
  """Ctrl-C: one line saying what is kept, exit status 130 (no traceback)."""
  if isinstance(error, RunInterrupted) and str(error):
    message = str(error)
  else:  # before the training loop (set-up) or after it (exports, summary)
    directory = os.path.join(workdir, "checkpoints") if workdir else ""
    try:
      steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    except OSError:
      steps = []
    kept = (f"checkpoint of step {steps[-1]} kept in {directory}" if steps
            else "no checkpoint written yet")
    message = f"interrupted outside the training loop; {kept}; run the same command to resume"
  _exit_with(f"\n{_one_line(message)}\n", 130)


def _exit_with(report: str, status: int) -> None:
  """Writes ``report`` as the last thing on stderr and ends the process with ``status``."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  # Library threads (Orbax's async workers after a failed save or restore) may still be
  # printing. stdout/stderr are pointed at /dev/null first, so that nothing they write can land
  # after the message; the message then goes, in one write, to the saved stderr; and the process
  # ends without interpreter shutdown, where those threads would print their tracebacks.
  stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.write(stderr, report.encode())
  os._exit(status)


_ENV_HINTS = {
    errno.ENOSPC: "free space and run the same command again (a training run resumes from its "
                  "last complete checkpoint)",
    errno.EDQUOT: "free space (disk quota) and run the same command again",
    errno.EACCES: "check the permissions, or choose another --workdir / path",
    errno.EPERM: "check the permissions, or choose another --workdir / path",
    errno.EROFS: "the file system is read-only: choose another --workdir / path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another --workdir / path",
    errno.EISDIR: "a folder stands where a file is expected: choose another path",
    errno.EEXIST: "a file stands where a folder is expected: choose another --workdir / path",
}


def environment_message(error: OSError, workdir: str | None = None) -> str:
  """One line for an error of the machine rather than the config: what, which file, what to do."""
  what = error.strerror or _one_line(str(error)) or type(error).__name__
  where = error.filename or workdir or ""
  hint = _ENV_HINTS.get(error.errno or -1, "")
  return f"{what}: {where}" + (f" ({hint})" if hint else "")


def _flag_error_message(error: Exception) -> str:
  """The cause of a flag-parsing failure, without ml_collections' nested tracebacks."""
  text = str(error)
  if isinstance(error, flags.IllegalFlagValueError) and "Traceback" in text:
    # A config file raised: its own exception is the last 'SomethingError: message' line.
    for line in reversed(text.splitlines()):
      match = _ERROR_LINE.match(line)
      if match:
        return f"{match.group(1)}: {match.group(2)}"
  if isinstance(error, (AttributeError, KeyError)):
    # A --config.x.y override naming no field (ml_collections: "'lrr' Did you mean ...").
    cleaned = _one_line(text.replace("\\n", "\n").replace("\\'", "'")).strip("'\" ")
    key = re.match(r"'?([^'\s]+)'?\s*(.*)$", cleaned)
    if key:
      cleaned = f"'{key.group(1)}'" + (f"; {key.group(2).strip(chr(39))}" if key.group(2) else "")
    return (f"unknown config key {cleaned} in a --config.* override (every key and its "
            "default is in idat_jax/config_lib.py)")
  return _one_line(text)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config-file and override errors reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"invalid flags: {_flag_error_message(e)}")
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    fail(f"invalid flags: {_flag_error_message(e)}")
  return []


def run(config, workdir: str) -> dict:
  # Imported late so that --helpfull stays fast and XLA flags from the shell apply.
  import jax
  from idat_jax import sharding, train
  from idat_jax.training import report
  from idat_jax.training.metrics import quiet_library_logs

  quiet_library_logs()
  jax.config.update("jax_threefry_partitionable", True)
  sharding.initialize_distributed(config.distributed)
  train.enable_compilation_cache(config, workdir)
  if config.mode == "train":
    summary = train.train_and_evaluate(config, workdir)
  elif config.mode == "eval":
    summary = train.evaluate_checkpoint(config, workdir)
  else:
    raise app.UsageError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")
  if jax.process_index() == 0:
    if _JSON.value:
      lines = [json.dumps(summary, default=str)]
    elif config.mode == "eval":
      lines = report.eval_lines(summary)
    else:
      lines = report.summary_lines(summary)
      if config.data.backend == "synthetic" and not summary.get("already_finished"):
        lines += report.speed_lines(summary, config.eval_every_epochs,
                                    config.checkpoint_every_epochs)
    print("\n".join(lines), flush=True)
  return summary


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  verbose = flags.FLAGS["verbosity"].value >= 1
  try:
    config = _CONFIG.value
    config.get("mode")  # the value is a proxy that raises the load error on first access
  except OSError as e:  # ml_collections defers a config file's load error to this access
    fail(f"cannot load --config: {str(e).strip().splitlines()[-1].strip()}", None, verbose)
  try:
    run(config, workdir)
  except IdatError as e:
    fail(str(e), workdir, verbose)
  except OSError as e:  # the environment: disk, permissions, network, a path that is a file
    fail(environment_message(e, workdir), workdir, verbose)
  except KeyboardInterrupt as e:
    interrupted(e, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
