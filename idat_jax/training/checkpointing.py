"""Orbax checkpoints of the train state (trainable params, optimizer state, step) + JSON meta.

Frozen backbones are not saved: they are re-read from their pretrained files, as big_vision's
distillation trainer does for its teachers. Restores always go through abstract
``ShapeDtypeStruct`` targets that carry the *current* shardings, so a checkpoint written on
8 devices restores on 1 (and vice versa).
"""

from __future__ import annotations

import copy
import errno
import os
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from idat_jax import fileio
from idat_jax.checkpoints.orbax_run import item_handlers
from idat_jax.errors import CheckpointError, CheckpointNotFoundError


# Name prefix of a step moved aside after it failed to restore (outside Orbax's step names).
CORRUPT_PREFIX = "corrupt-"


def abstract_like(tree: Any, sharding: Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _no_space(error: BaseException) -> bool:
  """Whether ``error`` (or what caused it, through Orbax's wrappers) is a full disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _by_path(tree: Any) -> dict[str, Any]:
  """Leaves by a container-neutral path ('opt/0/mu/student/head/kernel'): Orbax's metadata
  holds dicts and lists where the state holds optax's named tuples."""
  def name(entry) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return {"/".join(name(e) for e in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with items ``state`` and ``meta``.

  Saves are asynchronous; a failed write (e.g. a full disk) surfaces at the next save, wait or
  close as a :class:`CheckpointError` naming the step and directory.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, create: bool = True):
    if max_to_keep < 1:
      raise CheckpointError(f"max_to_keep={max_to_keep}: at least one checkpoint must be kept "
                            f"in {directory}")
    self.directory = fileio.abspath(directory)
    # The directory is made at the first save, not here: a run that fails its checks leaves
    # no empty checkpoints/ behind.
    self._create = create
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=item_handlers())
    self._pending: int | None = None  # step of the save in flight
    self._closed = False
    # Steps newer than the one the last restore(None) returned: they failed to restore.
    self.failed_steps: list[int] = []

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _translate(self, error: BaseException, step: int | None) -> BaseException:
    if _no_space(error):
      return CheckpointError(f"no space left on device while writing checkpoint step {step} "
                             f"to {self.directory}; free space (or point --workdir elsewhere) "
                             "and run the same command again to resume from the last "
                             "complete checkpoint")
    return error

  def _guard(self, fn: Callable[[], Any], step: int | None) -> Any:
    try:
      return fn()
    except Exception as e:  # noqa: BLE001  (re-raised, translated where we know the cause)
      translated = self._translate(e, step)
      if translated is e:
        raise
      raise translated from e

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    # A deep copy: the save is asynchronous and the caller keeps mutating its meta.
    meta = copy.deepcopy(meta)
    self._guard(self._manager.wait_until_finished, self._pending)
    self._pending = step
    if self._create and "://" not in self.directory:
      self._guard(lambda: os.makedirs(self.directory, exist_ok=True), step)
    self._guard(lambda: self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))), step)

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON meta of a step (latest by default) without restoring any array."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(f"no checkpoint found in {self.directory}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has unreadable "
                            f"metadata ({_first_line(e)})") from e
    return dict(restored["meta"] or {})

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``step``; with ``step=None`` the newest step that restores.

    A latest step that fails (a corrupt file, unreadable metadata) is logged and the next
    older one is tried; if none restores, the error lists every step and why it failed.
    """
    available = self.all_steps()
    if not available:
      raise CheckpointNotFoundError(f"no checkpoint found in {self.directory}")
    if step is not None and step not in available:
      raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available: {available}")
    candidates = [step] if step is not None else sorted(available, reverse=True)
    failures = []
    for candidate in candidates:
      mismatch = self._structure_mismatch(candidate, abstract_state)
      if mismatch:
        # Checked before Orbax's restore: a failed restore leaves its worker threads printing
        # tracebacks over the report.
        failures.append(f"step {candidate}: {mismatch}")
        logging.warning("checkpoint step %d in %s does not fit this run's model: %s", candidate,
                        self.directory, mismatch)
        continue
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001  (each failure is reported below)
        failures.append(f"step {candidate}: {_first_line(e)}")
        logging.warning("checkpoint step %d in %s does not restore: %s", candidate,
                        self.directory, _first_line(e, 1000))
        continue
      if failures:
        logging.warning("restored step %d instead of the newer step(s) that failed (%s)",
                        candidate, "; ".join(failures))
      self.failed_steps = [s for s in candidates if s > candidate]
      return restored["state"], dict(restored["meta"] or {})
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores into this run's model ("
        + "; ".join(failures) + "). A changed model (num_classes, adapter_dim, tuning mode) "
        "needs a new --workdir; a corrupt step can be deleted to resume from an older one")

  def move_aside(self, steps: list[int]) -> list[str]:
    """Renames unrestorable ``steps`` to ``corrupt-<step>-<UTC time>`` (kept for inspection).

    Orbax saves only steps above the newest step on disk, so a corrupt step left in place
    would silently swallow the save of the step retrained after a fallback. The new names are
    outside Orbax's step-name pattern. Process 0 renames; every process then re-reads the
    directory. Returns the new paths.
    """
    if not steps:
      return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for step in sorted(steps):
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}-{stamp}")
      moved.append(dst)
      if jax.process_index() == 0:
        try:
          if fileio.is_remote(src):
            from etils import epath  # what Orbax reads and writes gs:// with
            epath.Path(src).rename(dst)
          else:
            os.replace(src, dst)
        except (OSError, ImportError) as e:
          raise CheckpointError(f"cannot move the unrestorable checkpoint step {step} aside "
                                f"({src} -> {dst}: {e}); delete {src} and run again") from e
        logging.warning("moved the unrestorable checkpoint step %d aside to %s: the step "
                        "retrained after the fallback is saved in its place", step, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("idat_jax_checkpoint_move_aside")
    self._manager.reload()
    self.failed_steps = [s for s in self.failed_steps if s not in steps]
    return moved

  def _structure_mismatch(self, step: int, abstract_state: Any) -> str | None:
    """What differs between the stored arrays of ``step`` and the model's (None: they fit, or
    the metadata is unreadable, which the restore itself then reports)."""
    try:
      stored = self._manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001  (left to the restore, which names the failure)
      return None
    if stored is None:
      return None
    want, have = _by_path(abstract_state), _by_path(stored)
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
      parts = []
      if missing:
        parts.append(f"{len(missing)} array(s) the model has but the checkpoint lacks, e.g. "
                     f"{missing[0]}")
      if unexpected:
        parts.append(f"{len(unexpected)} stored array(s) the model lacks, e.g. {unexpected[0]}")
      return "; ".join(parts)
    for key, spec in want.items():
      shape = tuple(getattr(have[key], "shape", ()) or ())
      if shape != tuple(spec.shape):
        return f"stored shape {shape} of {key}, the model's is {tuple(spec.shape)}"
    return None

  def wait(self) -> None:
    self._guard(self._manager.wait_until_finished, self._pending)

  def close(self) -> None:
    """Waits for the save in flight and stops Orbax's threads (safe to call twice)."""
    if self._closed:
      return
    self._closed = True
    try:
      self._guard(self._manager.wait_until_finished, self._pending)
    finally:
      self._manager.close()
