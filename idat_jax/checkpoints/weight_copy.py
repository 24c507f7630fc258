"""WeCoLoRA's weight copy: a shallower student made of every r-th teacher block."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from idat_jax.errors import CheckpointError

_BLOCK = re.compile(r"encoderblock_(\d+)")


def _copy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  # NumPy arrays are mutable: copy them so editing the student never edits the teacher.
  # jax.Arrays are immutable and are shared.
  return tree.copy() if isinstance(tree, np.ndarray) else tree


def copy_blocks(params: Mapping[str, Any], every: int) -> dict[str, Any]:
  """Keeps teacher blocks ``0, r, 2r, ...`` (``r = every``) renumbered ``encoderblock_0..k-1``.

  Everything outside ``Transformer/encoderblock_*`` (patch embedding, class token, position
  embedding, final norm, head, pre_logits) is copied unchanged, as in WeCoLoRA
  (``mae/main_standard_kd.py``: ``blocks[i] for i % r == 0``). For a 12-block teacher, r=2
  keeps [0, 2, 4, 6, 8, 10] and r=3 keeps [0, 3, 6, 9]; the last block is never kept unless
  ``(depth - 1) % r == 0``. Build the student model with ``depth=ceil(depth / r)``.
  """
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f"copy_blocks: every must be an integer >= 1, got {every!r}")
  if "Transformer" not in params or not isinstance(params["Transformer"], Mapping):
    raise CheckpointError("copy_blocks: the tree has no 'Transformer' scope, so no encoder "
                          "blocks to copy")
  encoder = params["Transformer"]
  indices = sorted(int(m.group(1)) for k in encoder if (m := _BLOCK.fullmatch(k)))
  if not indices:
    raise CheckpointError("copy_blocks: no 'Transformer/encoderblock_{i}' entries; copying "
                          "would leave a student without blocks")
  if indices != list(range(len(indices))):
    raise CheckpointError(f"copy_blocks: encoder block indices {indices} are not "
                          f"0..{len(indices) - 1}")
  kept = list(range(0, len(indices), int(every)))
  student = {k: _copy(v) for k, v in params.items() if k != "Transformer"}
  new_encoder = {k: _copy(v) for k, v in encoder.items() if not _BLOCK.fullmatch(k)}
  for new, old in enumerate(kept):
    new_encoder[f"encoderblock_{new}"] = _copy(encoder[f"encoderblock_{old}"])
  student["Transformer"] = new_encoder
  return student


def kept_blocks(depth: int, every: int) -> list[int]:
  """Teacher block indices that :func:`copy_blocks` keeps for a ``depth``-block teacher."""
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f"every must be an integer >= 1, got {every!r}")
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}")
  return list(range(0, depth, int(every)))
