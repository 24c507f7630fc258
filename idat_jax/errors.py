"""Errors a user can cause, printed by ``idat_jax.main`` as one line (``error: <message>``).

Every message names the file or directory at fault, the model (student / teacher) where there
is one, and what to do. Each type also derives from the built-in exception it refines, so code
that catches ``ValueError`` or ``RuntimeError`` keeps working. This module sits below every
layer (it imports nothing of the project).
"""

from __future__ import annotations


class IdatError(Exception):
  """Base of the errors that ``main`` reports in one line (full traceback in the log file)."""


class ConfigError(IdatError, ValueError):
  """An invalid config value, or a config that does not match the run it would resume."""


class WorkdirError(IdatError, RuntimeError):
  """The work dir is in use by another process, or cannot hold this run."""


class CheckpointError(IdatError, ValueError):
  """A checkpoint that cannot be read, written, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A pretrained file or run checkpoint that is not where the config says."""


class StorageError(IdatError, OSError):
  """A remote (``gs://``) path that cannot be reached: a missing client library or access."""


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C during training; the message says the step reached and the checkpoint kept.

  A ``KeyboardInterrupt`` (so code that handles one still does): ``main`` prints the message
  in one line and exits with status 130, as a shell does for SIGINT.
  """
