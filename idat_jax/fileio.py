"""Atomic writes: build a file or directory under a temporary name, then rename it into place.

A crash, a full disk or a second process writing the same path then never leaves a half-written
file behind: readers see either the old complete version or the new complete version. This
module sits below every layer (it imports nothing of the project).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, directory: bool = False,
                 accept_existing: Callable[[str], bool] | None = None) -> Iterator[str]:
  """Yields a temporary path next to ``path``; on a clean exit it becomes ``path``.

  ``directory=False``: the temporary path is an (empty, closed) file with the same suffix as
  ``path`` (so ``np.savez`` and friends do not append another one); it replaces ``path``
  atomically (``os.replace``). ``directory=True``: the temporary path is an empty directory; an
  existing ``path`` is removed first, then the directory is renamed. A directory rename fails
  when a concurrent writer created ``path`` in between; then ``accept_existing(path)`` decides:
  true keeps the other writer's result and discards ours, false (or no callable) re-raises.
  On an exception inside the block the temporary path is removed and the exception propagates.
  """
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  prefix = f".{os.path.basename(path)}.tmp-"
  if directory:
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  else:
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
  try:
    yield tmp
    if not directory:
      # mkstemp makes the file private (0600); the result gets the usual umask-based mode.
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
      os.replace(tmp, path)
      return
    if os.path.lexists(path):
      _remove(path)
    try:
      os.rename(tmp, path)
    except OSError:
      if accept_existing is None or not accept_existing(path):
        raise
      _remove(tmp)
  except BaseException:
    _remove(tmp)
    raise
