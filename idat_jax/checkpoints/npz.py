"""Google-format ViT `.npz` files: read (official, Linen-style, big_vision) and write.

On disk the official files (gs://vit_models/imagenet21k, gs://vit_models/augreg) hold flat
slash-joined names with pre-Linen module numbers (``MultiHeadDotProductAttention_1``,
``LayerNorm_2``, ``MlpBlock_3``); that is also our in-memory tree, so reading is a rename-free
lookup for them. Variants accepted and normalised here:

* ``opt/target/`` prefix (older files that stored the optimizer target) and big_vision's
  ``params/`` prefix are stripped; other ``opt/...`` entries are reported as ignored.
* Linen-numbered blocks (``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``,
  as written by vit_jax's Linen model or big_vision) are renamed to the pre-Linen names.
* big_vision layouts: a scanned ``Transformer/encoderblock/...`` (leading depth axis) is
  unstacked into ``encoderblock_{i}``; a top-level ``pos_embedding`` without a class slot is
  moved under ``Transformer/posembed_input`` with a zero class slot prepended when the file
  has a ``cls`` token (big_vision adds no position embedding to the class token, so a zero
  slot computes the same function).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from idat_jax.checkpoints.merge import merge_lora as fold_lora
from idat_jax.errors import CheckpointError
from idat_jax.fileio import atomic_write
from idat_jax.tree_util import flatten

log = logging.getLogger(__name__)

POSEMB = "Transformer/posembed_input/pos_embedding"
_LINEN_TO_PRE_LINEN = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/([^/]+)(/.*)?")


def read_npz_arrays(path: str) -> dict[str, np.ndarray]:
  """Every array of an `.npz` (no pickles), with any read failure reported against ``path``."""
  try:
    data = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise CheckpointError(f"{path}: expected an .npz archive of named arrays, found a single "
                          ".npy array")
  try:
    return {name: np.asarray(data[name]) for name in data.files}
  except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, ... from a damaged member
    raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e
  finally:
    data.close()


def normalize_google_names(flat: Mapping[str, np.ndarray], path: str = "<tree>"
                           ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Official/Linen/big_vision flat names -> our names. Returns (params, ignored, notes)."""
  ignored: dict[str, str] = {}
  notes: list[str] = []
  flat = dict(flat)
  for prefix in ("opt/target/", "params/"):
    if any(k.startswith(prefix) for k in flat):
      kept = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      for k in flat:
        if not k.startswith(prefix):
          ignored[k] = f"outside the {prefix!r} parameter prefix"
      flat = kept
      notes.append(f"stripped the {prefix!r} prefix")
      break

  scanned = {k: v for k, v in flat.items() if k.startswith("Transformer/encoderblock/")}
  if scanned:
    depths = {v.shape[0] if v.ndim else None for v in scanned.values()}
    if len(depths) != 1 or None in depths:
      raise CheckpointError(f"{path}: scanned encoder blocks have inconsistent leading (depth) "
                            f"axes {sorted(map(str, depths))}")
    (depth,) = depths
    for k, v in scanned.items():
      del flat[k]
      rest = k[len("Transformer/encoderblock/"):]
      for i in range(depth):
        flat[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
    notes.append(f"unstacked {depth} scanned encoder blocks")

  if "pos_embedding" in flat:
    if POSEMB in flat:
      raise CheckpointError(f"{path}: has both a top-level 'pos_embedding' and {POSEMB!r}")
    pe = flat.pop("pos_embedding")
    if pe.ndim != 3 or pe.shape[0] != 1:
      raise CheckpointError(f"{path}: top-level pos_embedding has shape {pe.shape}, expected "
                            "(1, tokens, width)")
    if "cls" in flat:
      pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
      notes.append("moved big_vision's top-level pos_embedding under Transformer/posembed_input "
                   "with a zero class-token slot")
    else:
      notes.append("moved big_vision's top-level pos_embedding under Transformer/posembed_input")
    flat[POSEMB] = pe

  blocks: dict[str, set[str]] = {}
  for k in flat:
    m = _BLOCK.fullmatch(k)
    if m:
      blocks.setdefault(m.group(1), set()).add(m.group(2))
  linen_blocks = set()
  for idx, modules in blocks.items():
    linen = modules & set(_LINEN_TO_PRE_LINEN)
    pre = modules & set(_LINEN_TO_PRE_LINEN.values())
    if linen and pre:
      raise CheckpointError(f"{path}: encoderblock_{idx} mixes Linen ({sorted(linen)}) and "
                            f"pre-Linen ({sorted(pre)}) module names")
    if linen:
      linen_blocks.add(idx)
  if linen_blocks:
    renamed = {}
    for k, v in flat.items():
      m = _BLOCK.fullmatch(k)
      if m and m.group(1) in linen_blocks:
        module = _LINEN_TO_PRE_LINEN.get(m.group(2), m.group(2))
        k = f"Transformer/encoderblock_{m.group(1)}/{module}{m.group(3) or ''}"
      renamed[k] = v
    flat = renamed
    notes.append(f"renamed Linen module numbers to pre-Linen names in {len(linen_blocks)} "
                 "blocks")
  return flat, ignored, notes


def read_google_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """A Google-format `.npz` -> (flat params in our naming, ignored entries, notes)."""
  flat = read_npz_arrays(path)
  if not flat:
    raise CheckpointError(f"{path}: the .npz archive holds no arrays")
  for k, v in flat.items():
    if v.dtype.kind not in "fiub" and v.dtype != np.dtype(ml_dtypes.bfloat16):
      raise CheckpointError(f"{path}: entry {k!r} has non-numeric dtype {v.dtype}; not a "
                            "parameter checkpoint")
  return normalize_google_names(flat, path)


def _to_numpy(value: Any) -> np.ndarray:
  arr = np.asarray(value)
  # NumPy's file format has no bfloat16/float8 descriptor; readers (timm included) expect
  # plain float arrays, and float32 holds these values exactly.
  if arr.dtype.kind == "V" or arr.dtype in (np.dtype(ml_dtypes.bfloat16),
                                            np.dtype(ml_dtypes.float8_e4m3fn),
                                            np.dtype(ml_dtypes.float8_e5m2)):
    arr = arr.astype(np.float32)
  return arr


def save_npz(params: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes ``params`` as an uncompressed Google-format `.npz` (slash-joined names).

  The result is what timm's ``vision_transformer._load_weights`` and our ``load_params`` read.
  Extra subtrees (adapters, LoRA, SSF) are written too; timm ignores names it does not know.
  bfloat16/float8 leaves are stored as float32 (exact). The write is atomic (temp file +
  rename), and ``path`` is used exactly as given (no ``.npz`` appended).
  """
  path = os.fspath(path)
  arrays = {k: _to_numpy(v) for k, v in flatten(params).items()}
  if not arrays:
    raise CheckpointError(f"refusing to write {path}: the parameter tree is empty")
  with atomic_write(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


_PEFT = re.compile(r"(.*/)?(adapter|lora|ssf)/.*")


def export_npz(params: Mapping[str, Any], path: str | os.PathLike, merge_lora: bool = True,
               lora_scale: float = 1.0) -> list[str]:
  """Writes a deployable `.npz`: LoRA folded into the base kernels (``merge_lora=True``).

  ``lora_scale`` is the model's LoRA scale (alpha / rank; 1 in the WeCoLoRA reference).

  Returns the names of PEFT parameters that remain in the file (adapters and SSF cannot be
  folded into a plain ViT); timm's loader ignores them, so a timm model loading such a file
  computes the model *without* them — a warning is logged when that happens.
  """
  if merge_lora:
    params = fold_lora(params, scale=lora_scale)
  remaining = [k for k in flatten(params) if _PEFT.fullmatch(k)]
  if remaining:
    log.warning("export_npz(%s): %d PEFT parameters cannot be merged into a plain ViT and are "
                "written as extra entries (timm ignores them), e.g. %s", os.fspath(path),
                len(remaining), remaining[:3])
  save_npz(params, path)
  return remaining
