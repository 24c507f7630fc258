"""Pretrained weights by name: the checkpoints the recipes use, fetched once into a cache.

``--config.models.<m>.checkpoint`` takes any of

* a local or ``gs://`` path (used as it is);
* a short name from :data:`REGISTRY` (``augreg-in21k-B/16``, ``mae-vit-base``, ...), or the
  official file name of one (``B_16-i21k-300ep-...npz``), also as a path whose folder lacks
  the file: the recipes' ``ckpt_dir/<official name>`` defaults are fetched when missing;
* an ``http://`` or ``https://`` URL;
* ``hf-hub:ORG/NAME`` (timm's safetensors on the Hugging Face Hub, through huggingface_hub).

Downloads go to ``$IDAT_JAX_CACHE`` (default ``~/.cache/idat_jax/pretrained``) through a
``.part`` file that becomes the cached file only when its size matches the server's, it parses
as its format, and its published hash (or the sha256 prefix in a torch.hub-style file name,
``-80ecf9dd``) matches. The file's sha256 is recorded beside it and checked on every later
use; a file put at the cache path by hand (no record yet) is checked the same way (format,
published hash) and then recorded. Several processes of one host download once (a file lock);
on a pod each host fills its own cache. ``IDAT_JAX_OFFLINE=1`` (``HF_HUB_OFFLINE=1`` for Hub
names) uses the cache only. ``IDAT_JAX_PRETRAINED_MIRROR=URL`` fetches registry files from
``URL/<file name>`` instead of their home (a mirror; the tests' local server).

Every failure is a :class:`DownloadError` whose one-line message names the checkpoint, the
URL and where a hand-downloaded file would be picked up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence

import numpy as np

from idat_jax import fileio
from idat_jax.errors import CheckpointError, CheckpointNotFoundError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# torch.hub's convention: a file name ending in '-<hex>.<ext>' carries a sha256 prefix.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_CHUNK = 1 << 20


class DownloadError(CheckpointError):
  """A pretrained checkpoint that could not be fetched or verified (one-line message)."""


class NotCachedError(DownloadError, CheckpointNotFoundError):
  """Offline mode, and the checkpoint is not in the cache: a missing file like any other."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A published checkpoint: its official file name, where it is served, its hash if any."""
  name: str
  filename: str
  urls: tuple[str, ...]
  sha256: str = ""  # full digest or published prefix; '' where none is published
  description: str = ""


_AUGREG = "https://storage.googleapis.com/vit_models/augreg/"
REGISTRY: dict[str, Pretrained] = {p.name: p for p in (
    Pretrained("augreg-in21k-B/16",
               "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
               (_AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",),
               description="iDAT student: AugReg ViT-B/16, ImageNet-21k (How to train your ViT)"),
    Pretrained("augreg-in21k-S/16",
               "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
               (_AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",),
               description="iDAT teacher: AugReg ViT-S/16, ImageNet-21k"),
    Pretrained("timm-vit-base-patch16-224-jx", "jx_vit_base_p16_224-80ecf9dd.pth",
               ("https://github.com/rwightman/pytorch-image-models/releases/download/"
                "v0.1-vitjx/jx_vit_base_p16_224-80ecf9dd.pth",),
               sha256="80ecf9dd",
               description="WeCoLoRA supervised teacher: timm 0.3.2 vit_base_patch16_224 "
                           "(ImageNet-21k + 1k fine-tuning, from the JAX release)"),
    Pretrained("mae-vit-base", "mae_pretrain_vit_base.pth",
               ("https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",),
               description="WeCoLoRA SSL teacher: MAE ViT-B/16 pre-trained encoder"),
)}
_BY_FILENAME = {p.filename: p for p in REGISTRY.values()}


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("IDAT_JAX_CACHE")
                            or os.path.join("~", ".cache", "idat_jax", "pretrained"))


def offline() -> bool:
  return os.environ.get("IDAT_JAX_OFFLINE", "").lower() in ("1", "true", "yes")


def _env_number(name: str, default: float) -> float:
  try:
    return float(os.environ.get(name, default))
  except ValueError:
    raise DownloadError(f"${name}={os.environ[name]!r} is not a number") from None


def lookup(spec: str) -> Pretrained | None:
  """The registry entry a name, an official file name or a path ending in one refers to."""
  return REGISTRY.get(spec) or _BY_FILENAME.get(os.path.basename(spec))


def resolve(spec: str, *, model: str = "", search_dirs: Sequence[str] = ()) -> str:
  """A local (or ``gs://``) path for ``spec``, fetching it into the cache where needed.

  ``search_dirs``: folders where a hand-downloaded file of a registry name is looked for
  first. A path that exists, and one that is neither a URL, a Hub name nor a registry file,
  is returned unchanged (the caller reports a missing file).
  """
  if not spec:
    return spec
  what = f"pretrained checkpoint {spec!r}" + (f" of model '{model}'" if model else "")
  if spec.startswith(HUB_PREFIX):
    return _from_hub(spec[len(HUB_PREFIX):], what)
  if spec.startswith(("http://", "https://")):
    filename = os.path.basename(urllib.parse.urlparse(spec).path)
    if not filename:
      raise DownloadError(f"{what}: the URL names no file")
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    dest = os.path.join(cache_dir(), "urls", digest, filename)
    return download(what, (spec,), dest, sha256=_hash_in_name(filename))
  if fileio.is_remote(spec) or os.path.exists(spec):
    return spec
  entry = lookup(spec)
  if entry is None:
    return spec
  folders = list(search_dirs)
  if spec not in REGISTRY and os.path.dirname(spec):
    folders.insert(0, os.path.dirname(spec))  # the recipe's ckpt_dir
  for folder in folders:
    candidate = os.path.join(folder, entry.filename)
    if os.path.isfile(candidate):
      return candidate
  dest = os.path.join(cache_dir(), entry.filename)
  hand = os.path.abspath(os.path.join(folders[0], entry.filename)) if folders else dest
  if spec != entry.name:
    what += f" ({entry.name})"
  return download(what, mirrored(entry), dest,
                  sha256=entry.sha256 or _hash_in_name(entry.filename), hand_path=hand)


resolve_checkpoint = resolve  # (the package also exports it as resolve_pretrained)


def mirrored(entry: Pretrained) -> tuple[str, ...]:
  """The entry's URLs, or its file under ``$IDAT_JAX_PRETRAINED_MIRROR`` when that is set."""
  mirror = os.environ.get("IDAT_JAX_PRETRAINED_MIRROR", "").rstrip("/")
  return (f"{mirror}/{entry.filename}",) if mirror else entry.urls


def _hash_in_name(filename: str) -> str:
  match = _HASH_IN_NAME.search(filename)
  return match.group(1) if match else ""


# ---------------------------------------------------------------------------------------------
# The download.


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


@contextlib.contextmanager
def _host_lock(path: str) -> Iterator[None]:
  """One process of this host at a time fetches ``path`` (the others wait, then reuse it)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) whose hash matched here


def _cached(dest: str, what: str) -> bool:
  """True when ``dest`` is a complete download whose recorded sha256 still matches. A file
  that no longer matches its record is moved out of the way (with a warning) and fetched anew."""
  record = dest + ".sha256"
  if not (os.path.isfile(dest) and os.path.isfile(record)):
    return False
  stat = os.stat(dest)
  key = (dest, stat.st_size, stat.st_mtime_ns)
  if key in _VERIFIED:  # hashed once per process (WeCoLoRA's teacher and student share a file)
    return True
  with open(record, encoding="utf-8") as f:
    recorded = (f.read().split() or [""])[0]
  actual = sha256_of(dest)
  if actual == recorded:
    _VERIFIED.add(key)
    return True
  log.warning("%s: the cached %s changed since it was downloaded (sha256 %s, recorded %s); "
              "fetching it again", what, dest, actual[:12], recorded[:12])
  os.replace(dest, dest + ".corrupt")
  os.remove(record)
  return False


def _adopted(dest: str, what: str, sha256: str) -> bool:
  """True when ``dest`` has no sha256 record yet (put there by hand, or a run stopped between
  the rename and the record) but is a whole, verified checkpoint: its sha256 is recorded now.
  A file that fails the checks is moved out of the way (with a warning) and fetched anew."""
  if not os.path.isfile(dest) or os.path.isfile(dest + ".sha256"):
    return False
  try:
    _check_download(dest, dest, dest, sha256)
  except DownloadError as e:
    log.warning("%s: ignoring %s, which is not the checkpoint (%s)", what, dest, e)
    os.replace(dest, dest + ".corrupt")
    return False
  _record(dest, "placed by hand")
  return True


def _record(dest: str, source: str) -> str:
  digest = sha256_of(dest)
  record = dest + ".sha256"
  with open(record + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"{digest}  {os.path.basename(dest)}  {source}\n")
  os.replace(record + ".tmp", record)
  return digest


def download(what: str, urls: Sequence[str], dest: str, *, sha256: str = "",
             hand_path: str | None = None) -> str:
  """``dest``, downloaded from the first of ``urls`` that serves it, verified and recorded."""
  hand_path = hand_path or dest
  try:
    return _download_locked(what, urls, dest, sha256, hand_path)
  except DownloadError:  # (NotCachedError is also an OSError)
    raise
  except OSError as e:  # the cache itself: not writable, a full disk outside the body, ...
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    raise DownloadError(
        f"{what}: cannot write the cache at {dest} ("
        + ("no space left on device" if full else (e.strerror or str(e)))
        + f"); set IDAT_JAX_CACHE to a writable folder with room, or download {urls[0]} by hand "
        f"to {hand_path}") from None


def _download_locked(what: str, urls: Sequence[str], dest: str, sha256: str,
                     hand_path: str) -> str:
  with _host_lock(dest):
    if _cached(dest, what) or _adopted(dest, what, sha256):
      return dest
    if offline():
      raise NotCachedError(f"{what} is not in the cache ({dest}) and IDAT_JAX_OFFLINE is set: "
                          f"download {urls[0]} to {hand_path}, or unset IDAT_JAX_OFFLINE")
    errors = []
    for url in urls:
      try:
        _fetch_verified(url, dest, sha256)
        return dest
      except DownloadError as e:
        errors.append(str(e))
    raise DownloadError(f"{what}: " + "; ".join(errors) + f". Download it by hand to {hand_path}"
                        " (it is then used as it is), or check the network/URL and run again")


def _fetch_verified(url: str, dest: str, sha256: str) -> None:
  part = dest + ".part"
  stale = os.path.isfile(part)  # left by an earlier, interrupted run: resumed below
  retries = int(_env_number("IDAT_JAX_DOWNLOAD_RETRIES", 4))
  backoff = _env_number("IDAT_JAX_DOWNLOAD_BACKOFF", 1.0)
  attempt = 0
  while True:
    try:
      _fetch(url, part)
      break
    except _Transient as e:
      attempt += 1
      if attempt > retries:
        raise DownloadError(f"{url}: {e} (after {retries} retries)") from None
      delay = backoff * 2 ** (attempt - 1)
      log.warning("%s: %s; retrying in %.1f s (%d/%d)", url, e, delay, attempt, retries)
      time.sleep(delay)
  try:
    _check_download(url, part, dest, sha256)
  except DownloadError as e:
    _remove(part)
    if stale:  # the earlier part may be of another version of the file: start over once
      log.warning("%s: the resumed download failed its checks (%s); starting over", url, e)
      _fetch_verified(url, dest, sha256)
      return
    raise
  os.replace(part, dest)
  digest = _record(dest, url)
  log.info("downloaded %s to %s (sha256 %s)", url, dest, digest)


class _Transient(Exception):
  """A failure worth retrying (refused or reset connection, timeout, 5xx, short body)."""


def _fetch(url: str, part: str) -> None:
  """Downloads ``url`` into ``part``, resuming an earlier partial file where the server allows.
  Raises :class:`_Transient` for what may pass, :class:`DownloadError` for what will not."""
  have = os.path.getsize(part) if os.path.isfile(part) else 0
  request = urllib.request.Request(url, headers={"User-Agent": "idat-jax",
                                                 "Accept-Encoding": "identity"})
  if have:
    request.add_header("Range", f"bytes={have}-")
  timeout = _env_number("IDAT_JAX_DOWNLOAD_TIMEOUT", 60.0)
  try:
    response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http(s) only)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # the partial file is already whole (or longer): start over
      _remove(part)
      raise _Transient("HTTP 416 for a resumed download; starting over") from None
    if e.code >= 500 or e.code == 429:
      raise _Transient(f"HTTP {e.code} {e.reason}") from None
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise _Transient(f"cannot connect ({reason})") from None
  with response:
    if "text/html" in (response.headers.get("Content-Type") or ""):
      raise DownloadError(f"{url}: the server sent an HTML page, not the checkpoint "
                          "(a login, error or landing page?)")
    resumed = have and response.status == 206
    total = _expected_size(response, have if resumed else 0)
    mode = "ab" if resumed else "wb"
    done = have if resumed else 0
    try:
      with open(part, mode) as f, _progress(total, done, os.path.basename(part[:-5])) as bar:
        while True:
          try:
            chunk = response.read(_CHUNK)
          except (OSError, ValueError) as e:  # reset or timed out mid-body
            raise _Transient(f"connection lost after {done} bytes ({e})") from None
          if not chunk:
            break
          f.write(chunk)
          done += len(chunk)
          bar.update(len(chunk))
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EDQUOT):
        _remove(part)
        raise DownloadError(f"{url}: no space left on device while writing {part} (free space, "
                            "or set IDAT_JAX_CACHE to a larger disk)") from None
      raise
  if total is not None and done < total:
    raise _Transient(f"truncated body: got {done} of {total} bytes")
  if total is not None and done > total:
    _remove(part)
    raise DownloadError(f"{url}: got {done} bytes, more than the {total} the server announced")


def _expected_size(response, offset: int) -> int | None:
  """The whole file's size in bytes, from Content-Range (a resumed download) or -Length."""
  content_range = response.headers.get("Content-Range") or ""
  if offset and "/" in content_range and not content_range.endswith("/*"):
    return int(content_range.rsplit("/", 1)[1])
  length = response.headers.get("Content-Length")
  return offset + int(length) if length is not None else None


@contextlib.contextmanager
def _progress(total: int | None, initial: int, name: str):
  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
             desc=f"downloading {name}", disable=not sys.stderr.isatty(), leave=False)
  try:
    yield bar
  finally:
    bar.close()


def _check_download(url: str, part: str, dest: str, sha256: str) -> None:
  """The finished ``.part`` is the file: not an HTML page, parses as its format, hash matches."""
  with open(part, "rb") as f:
    head = f.read(512).lstrip().lower()
  if head.startswith((b"<!doctype html", b"<html", b"<?xml")):
    raise DownloadError(f"{url}: the server sent an HTML/XML page, not the checkpoint")
  if sha256:
    actual = sha256_of(part)
    if not actual.startswith(sha256.lower()):
      raise DownloadError(f"{url}: sha256 {actual[:len(sha256)]}... does not match the "
                          f"published {sha256} (a corrupted or different file)")
  problem = format_problem(part, os.path.splitext(dest)[1].lower())
  if problem:
    raise DownloadError(f"{url}: the downloaded file is not a readable "
                        f"{os.path.splitext(dest)[1]} checkpoint ({problem})")


def format_problem(path: str, ext: str) -> str | None:
  """Why ``path`` does not parse as a checkpoint of extension ``ext`` (None: it does)."""
  try:
    if ext == ".npz" or (ext in (".pth", ".pt", ".bin") and zipfile.is_zipfile(path)):
      with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
          return f"member {bad} fails its CRC"
        if not z.namelist():
          return "an empty archive"
      if ext == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
          if not arrays.files:
            return "no arrays"
      return None
    if ext == ".safetensors":
      from idat_jax.checkpoints.safetensors_io import read_safetensors
      read_safetensors(path)
      return None
    if ext in (".pth", ".pt", ".bin"):  # torch's legacy (non-zip) format
      from idat_jax.checkpoints.torch_state import read_torch_file
      read_torch_file(path)
      return None
  except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, RuntimeError) as e:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
  return None


def _remove(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub.


def _from_hub(repo: str, what: str) -> str:
  """``model.safetensors`` (else ``pytorch_model.bin``) of a Hub repo, in the Hub's cache."""
  try:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors
  except ImportError:
    raise DownloadError(f"{what}: Hub names need the huggingface_hub package "
                        "(pip install huggingface_hub)") from None
  hub_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
  endpoint = os.environ.get("HF_ENDPOINT") or None
  tried = []
  for filename in ("model.safetensors", "pytorch_model.bin"):
    url = f"{endpoint or 'https://huggingface.co'}/{repo}/resolve/main/{filename}"
    try:
      path = huggingface_hub.hf_hub_download(repo, filename, endpoint=endpoint,
                                             local_files_only=hub_offline or offline())
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as e:
      # (LocalEntryNotFoundError derives from EntryNotFoundError: caught first.)
      if hub_offline or offline():
        raise NotCachedError(
            f"{what}: not in the Hugging Face cache and offline mode is set (HF_HUB_OFFLINE or "
            f"IDAT_JAX_OFFLINE): run once online, or download {url} by hand and give its "
            "path") from None
      tried.append(f"{url}: {_first_line(e)}")
      break
    except hub_errors.EntryNotFoundError:
      tried.append(f"{url}: not in the repo")
      continue
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
      tried.append(f"{url}: {_first_line(e)}")
      break
    problem = format_problem(path, os.path.splitext(filename)[1])
    if problem:
      raise DownloadError(f"{what}: {url} is not a readable checkpoint ({problem})")
    return path
  raise DownloadError(f"{what}: " + "; ".join(tried) + ". Download the weights by hand and give "
                      "their path as the checkpoint")


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def describe() -> str:
  """The registry as text (names, files, hashes, URLs): what ``python -m idat_jax.checkpoints``
  lists."""
  lines = []
  for p in REGISTRY.values():
    lines.append(f"{p.name:32s} {p.filename}" + (f"  sha256 {p.sha256}..." if p.sha256 else ""))
    lines.append(f"{'':32s} {p.description}")
    lines += [f"{'':32s} {u}" for u in p.urls]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m idat_jax.checkpoints [NAME|URL|hf-hub:...]...``: lists the registry,
  or fetches each named checkpoint into the cache (e.g. before a job on a host without a
  network) and prints its path."""
  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] in ("-h", "--help", "list"):
    print(describe())
    print(f"\ncache: {cache_dir()} (IDAT_JAX_CACHE)")
    return 0
  for spec in args:
    try:
      print(resolve(spec))
    except CheckpointError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  return 0
