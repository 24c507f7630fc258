"""``load_params``: any supported checkpoint file -> our parameter tree (NumPy leaves)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idat_jax import fileio
from idat_jax.checkpoints.merge import MergeReport, merge_pretrained
from idat_jax.checkpoints.npz import read_google_npz
from idat_jax.checkpoints.safetensors_io import read_safetensors
from idat_jax.checkpoints.torch_state import convert_torch_state, read_torch_file
from idat_jax.errors import CheckpointError
from idat_jax.tree_util import flatten, unflatten

log = logging.getLogger(__name__)

FORMATS = {".npz": "google_npz", ".safetensors": "safetensors", ".pth": "torch", ".pt": "torch",
           ".bin": "torch"}


@dataclasses.dataclass
class LoadInfo:
  """How a file was read: its format, what was dropped (with reasons) and conversions made."""
  path: str
  format: str
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"{self.path}: {self.format}"]
    lines += [f"  note: {n}" for n in self.notes]
    lines += [f"  ignored: {k} ({why})" for k, why in self.ignored.items()]
    return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike, *, num_heads: int | None = None,
                    fc_norm: str = "error", ignore: Sequence[str] = ()
                    ) -> tuple[dict[str, Any], LoadInfo]:
  """Like :func:`load_params`, also returning a :class:`LoadInfo` report."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise CheckpointError(f"{path}: unknown checkpoint type {ext or '(no extension)'!r}; "
                          f"supported: {sorted(FORMATS)}")
  if not fileio.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if fileio.is_remote(path):
    local = fileio.local_copy(path)  # the readers memory-map or seek: read a host-local copy
    log.info("%s: reading this host's copy %s", path, local)
    path = local
  fmt = FORMATS[ext]
  if fmt == "google_npz":
    flat, ignored, notes = read_google_npz(path)
  else:
    state = read_safetensors(path) if fmt == "safetensors" else read_torch_file(path)
    flat, ignored, notes = convert_torch_state(state, num_heads=num_heads, fc_norm=fc_norm,
                                               ignore=ignore, path=path)
  info = LoadInfo(path, fmt, ignored, notes)
  if ignored:
    log.warning("%s: ignored %d entries: %s", path, len(ignored), sorted(ignored)[:10])
  log.info("%s", info.summary())
  return unflatten(flat), info


def load_params(path: str | os.PathLike, *, num_heads: int | None = None,
                fc_norm: str = "error", ignore: Sequence[str] = ()) -> dict[str, Any]:
  """The parameter tree (our official-npz naming, NumPy leaves) of any supported file.

  Formats, by extension: Google ``.npz`` (official in21k with ``pre_logits``, AugReg in21k and
  fine-tuned, ``opt/target/`` prefix, Linen and big_vision layouts); PyTorch timm / DeiT / MAE
  state dicts as ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``,
  never a full unpickle). For PyTorch files ``num_heads`` splits the fused qkv; by default it
  is inferred from the width of the standard variants (see ``torch_state``). ``fc_norm`` and
  ``ignore`` control non-encoder entries (MAE decoder weights are always dropped and reported;
  :func:`read_checkpoint` returns that report). Unreadable files raise ``CheckpointError``
  (a ``ValueError``) naming the file.
  """
  return read_checkpoint(path, num_heads=num_heads, fc_norm=fc_norm, ignore=ignore)[0]


def _heads_of(init_params: Mapping[str, Any]) -> int | None:
  for name, leaf in flatten(init_params).items():
    if name.endswith("MultiHeadDotProductAttention_1/query/kernel") and len(leaf.shape) == 3:
      return int(leaf.shape[1])
  return None


def load_pretrained(init_params: Mapping[str, Any], path: str | os.PathLike, *,
                    init_only: Sequence[str] = (), ignore_unexpected: Sequence[str] = (),
                    posemb_resize: str = "vit_jax", fc_norm: str = "error",
                    ignore: Sequence[str] = ()) -> tuple[dict[str, Any], MergeReport]:
  """``load_params`` then ``merge_pretrained``; PyTorch files take the model's head count."""
  loaded, info = read_checkpoint(path, num_heads=_heads_of(init_params), fc_norm=fc_norm,
                                 ignore=ignore)
  try:
    merged, report = merge_pretrained(init_params, loaded, init_only=init_only,
                                      ignore_unexpected=ignore_unexpected,
                                      posemb_resize=posemb_resize)
  except CheckpointError as e:
    raise CheckpointError(f"{info.path}: {e}") from None
  for k, why in info.ignored.items():
    report.ignored.setdefault(k, f"dropped while reading: {why}")
  return merged, report


def tree_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Same names, shapes and values (NaNs equal); handy for checking round trips."""
  fa, fb = flatten(a), flatten(b)
  return fa.keys() == fb.keys() and all(
      np.shape(fa[k]) == np.shape(fb[k]) and
      np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]), equal_nan=True) for k in fa)
