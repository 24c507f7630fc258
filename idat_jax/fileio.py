"""Files of a run, local or remote (``gs://``), and atomic writes.

Atomic writes build a file or directory under a temporary name, then rename it into place: a
crash, a full disk or a second process writing the same path never leaves a half-written file
behind. Remote paths (any ``scheme://``, in practice a Cloud TPU run's ``gs://`` work dir) go
through ``etils.epath``, as Orbax's checkpoints do, so every file of a run lands where its
checkpoints do. Object stores have no rename and no append: a remote file is built locally and
uploaded whole (one object write, which is atomic on GCS). This module sits below every layer
but ``errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

from idat_jax.errors import StorageError

# Where a host keeps what must be local whatever the work dir (memory-mapped decode caches,
# compiled programs, downloaded pretrained files): one per user and host.
HOST_CACHE = os.path.join("~", ".cache", "idat_jax")
_UPLOAD_CHUNK = 16 << 20


def is_remote(path: str | os.PathLike) -> bool:
  """``gs://bucket/...`` and other ``scheme://`` paths (read and written through etils)."""
  return "://" in os.fspath(path)


def host_cache_dir(name: str) -> str:
  """``~/.cache/idat_jax/<name>``: this host's own directory for ``name``."""
  return os.path.expanduser(os.path.join(HOST_CACHE, name))


def abspath(path: str | os.PathLike) -> str:
  """``os.path.abspath`` for local paths; remote paths are absolute already."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def _remote(path: str, action: Callable[[Any], Any]) -> Any:
  """Runs ``action(epath.Path(path))``; a missing client library becomes one clear error."""
  from etils import epath
  try:
    return action(epath.Path(path))
  except ImportError as e:
    raise StorageError(
        f"{path}: cannot open remote storage ({e}). gs:// paths need gcsfs (pip install gcsfs) "
        "or TensorFlow (tf.io.gfile), and credentials (gcloud auth application-default login "
        "or the VM's service account)") from None


def exists(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _remote(path, lambda p: p.exists()) if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _remote(path, lambda p: p.is_dir()) if is_remote(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return _remote(path, lambda p: p.is_file()) if is_remote(path) else os.path.isfile(path)


def makedirs(path: str | os.PathLike) -> None:
  path = os.fspath(path)
  if is_remote(path):
    _remote(path, lambda p: p.mkdir(parents=True, exist_ok=True))
  else:
    os.makedirs(path, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r", *, encoding: str | None = None,
              newline: str | None = None) -> IO:
  """``open`` for local and remote paths, with the same text semantics.

  Remote files are read whole (text is decoded here, as ``open`` would) or written in binary;
  they cannot be appended to or written as text piecewise (object stores write whole objects):
  use :func:`write_text` or :func:`atomic_write` for those.
  """
  path = os.fspath(path)
  if not is_remote(path):
    if "b" in mode:
      return open(path, mode)
    return open(path, mode, encoding=encoding, newline=newline)
  if mode in ("r", "rt"):
    data = _remote(path, lambda p: p.read_bytes())
    return io.TextIOWrapper(io.BytesIO(data), encoding=encoding or "utf-8", newline=newline)
  if mode not in ("rb", "wb"):
    raise ValueError(f"{path}: mode {mode!r} is not supported on remote storage (write whole "
                     "files with fileio.write_text or fileio.atomic_write)")
  return _remote(path, lambda p: p.open(mode))


def read_text(path: str | os.PathLike, newline: str | None = None) -> str:
  with open_file(path, encoding="utf-8", newline=newline) as f:
    return f.read()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (local or remote)."""
  with atomic_write(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def _upload(local: str, path: str) -> None:
  """Copies a local file or directory tree to the remote ``path`` (replacing what is there)."""
  if os.path.isdir(local):
    if isdir(path):
      _remote(path, lambda p: p.rmtree())
    makedirs(path)
    for name in sorted(os.listdir(local)):
      _upload(os.path.join(local, name), path.rstrip("/") + "/" + name)
    return
  with open(local, "rb") as src, open_file(path, "wb") as dst:
    shutil.copyfileobj(src, dst, _UPLOAD_CHUNK)


def local_copy(path: str | os.PathLike) -> str:
  """A local path holding the file ``path``: itself when local; for a remote file, a copy in
  :func:`host_cache_dir` ('remote'), downloaded once per host and size."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  size = _remote(path, lambda p: p.stat().length)
  key = hashlib.sha256(path.encode()).hexdigest()[:16]
  local = os.path.join(host_cache_dir("remote"), key, os.path.basename(path.rstrip("/")))
  if os.path.isfile(local) and os.path.getsize(local) == size:
    return local
  with atomic_write(local) as tmp:
    with open_file(path, "rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, _UPLOAD_CHUNK)
  return local


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
  A remote ``path`` gets a local temporary path, uploaded on a clean exit.
  """
  path = os.fspath(path)
  if is_remote(path):
    staging = tempfile.mkdtemp(prefix="idat_jax-upload-")
    try:
      tmp = os.path.join(staging, os.path.basename(path.rstrip("/")) or "upload")
      if directory:
        os.mkdir(tmp)
      else:
        open(tmp, "wb").close()
      yield tmp
      _upload(tmp, path)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    return
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
