"""Merging trees: a loaded checkpoint into a fresh init (strictly), and LoRA into its kernels.

``merge_pretrained`` is strict by default because a silently half-loaded backbone trains fine
and just reports worse numbers; every difference must be named by the caller (``init_only``,
``ignore_unexpected``) or it is an error. ``merge_lora`` folds trained low-rank updates into
the weights they modify, for export and for probing a distilled student: a NumPy operation on
the parameter tree, so it lives here with the other tree-to-file operations, below the models.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idat_jax.errors import CheckpointError
from idat_jax.tree_util import flatten, unflatten

POSEMB_SUFFIX = "posembed_input/pos_embedding"
RESIZE_METHODS = ("vit_jax", "timm")


def _linear_weights(n_in: int, n_out: int, align_corners: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (lo, hi) and weight of hi for 1-D linear resampling n_in -> n_out."""
  i = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
  else:
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
  src = np.minimum(src, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, src - lo


def resize_posemb(posemb: np.ndarray, new_grid: tuple[int, int], *,
                  old_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 1,
                  new_prefix_tokens: int | None = None, method: str = "vit_jax") -> np.ndarray:
  """Bilinearly resamples the patch grid of a (1, prefix + h*w, D) position embedding.

  The ``num_prefix_tokens`` leading (class) slots are copied exactly; with
  ``new_prefix_tokens=0`` they are dropped (class-token checkpoint -> GAP model), and a
  missing slot is added as zeros when ``new_prefix_tokens=1``. ``old_grid`` defaults to a
  square grid. Conventions:

  * ``"vit_jax"`` (default): corner-aligned bilinear (``align_corners=True``), i.e. what
    ``scipy.ndimage.zoom(order=1)`` computes in vit_jax's ``interpolate_posembed`` and
    big_vision's ``resample_posemb`` — the recipe the Google checkpoints were fine-tuned with.
  * ``"timm"``: half-pixel-centred bilinear without antialiasing
    (``F.interpolate(mode='bilinear', align_corners=False)``), as timm's npz loader does.

  Equal grids return the grid part unchanged (the identity, bit for bit).
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"method must be one of {RESIZE_METHODS}, got {method!r}")
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise CheckpointError(f"position embedding must have shape (1, tokens, width), got "
                          f"{posemb.shape}")
  new_prefix = num_prefix_tokens if new_prefix_tokens is None else new_prefix_tokens
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  n, width = grid.shape
  if old_grid is None:
    side = math.isqrt(n)
    if side * side != n:
      raise CheckpointError(f"cannot infer a square grid from {n} position tokens "
                            f"(posemb shape {posemb.shape}, {num_prefix_tokens} prefix tokens); "
                            "pass old_grid=(h, w)")
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != n:
    raise CheckpointError(f"old_grid {old_grid} does not match {n} position tokens")
  grid = grid.reshape(old_grid[0], old_grid[1], width)
  if tuple(new_grid) != tuple(old_grid):
    dtype = grid.dtype
    g = grid.astype(np.float64)
    align = method == "vit_jax"
    lo, hi, w = _linear_weights(old_grid[0], new_grid[0], align)
    g = g[lo] * (1 - w)[:, None, None] + g[hi] * w[:, None, None]
    lo, hi, w = _linear_weights(old_grid[1], new_grid[1], align)
    g = g[:, lo] * (1 - w)[None, :, None] + g[:, hi] * w[None, :, None]
    grid = g.astype(dtype)
  grid = grid.reshape(1, new_grid[0] * new_grid[1], width)
  if new_prefix == num_prefix_tokens:
    head = prefix
  elif new_prefix < num_prefix_tokens:
    head = prefix[:, :new_prefix]
  else:
    head = np.concatenate(
        [prefix, np.zeros((1, new_prefix - num_prefix_tokens, width), posemb.dtype)], axis=1)
  return np.concatenate([head, grid], axis=1)


@dataclasses.dataclass
class MergeReport:
  """What ``merge_pretrained`` did with every parameter (names are slash-joined)."""
  loaded: list[str] = dataclasses.field(default_factory=list)
  kept_from_init: list[str] = dataclasses.field(default_factory=list)
  resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=dict)
  cast: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    lines = [f"loaded {len(self.loaded)} arrays, kept {len(self.kept_from_init)} from init, "
             f"resized {len(self.resized)}, cast {len(self.cast)}, ignored {len(self.ignored)}"]
    lines += [f"  kept from init: {k}" for k in self.kept_from_init]
    lines += [f"  resized: {k} {a} -> {b}" for k, (a, b) in self.resized.items()]
    lines += [f"  ignored: {k} ({why})" for k, why in self.ignored.items()]
    return "\n".join(lines)

  __str__ = summary


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  return tuple(x.shape), np.dtype(x.dtype)


def merge_pretrained(init_params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                     init_only: Sequence[str] = (), ignore_unexpected: Sequence[str] = (),
                     posemb_resize: str = "vit_jax") -> tuple[dict[str, Any], MergeReport]:
  """Every parameter of ``init_params`` taken from ``loaded``, strictly.

  * ``init_only``: regexes (full match on slash-joined names) of parameters kept from init,
    e.g. ``'head/.*'`` for a new class count or ``'.*/(adapter|lora|ssf)/.*'`` for fresh PEFT
    weights; checkpoint entries under these names are reported as ignored.
  * ``ignore_unexpected``: regexes of checkpoint entries the model does not have and that may
    be dropped (e.g. ``'pre_logits/.*'`` for a model without a representation layer).
  * Position embeddings (``.../posembed_input/pos_embedding``) whose grid differs are resized
    with :func:`resize_posemb` (class slot kept; ``posemb_resize`` picks the convention).

  Missing entries, unexpected entries and shape mismatches are collected and raised as ONE
  ``CheckpointError`` (a ``ValueError``) naming all of them. Loaded arrays are cast to the init
  dtype; init leaves that are kept are returned as they were (e.g. on-device arrays), loaded
  ones as NumPy arrays.
  """
  init_flat, loaded_flat = flatten(init_params), flatten(loaded)
  init_res = [re.compile(p) for p in init_only]
  ignore_res = [re.compile(p) for p in ignore_unexpected]
  report = MergeReport()
  merged: dict[str, Any] = {}
  missing, mismatched = [], []
  has_cls_init, has_cls_loaded = "cls" in init_flat, "cls" in loaded_flat

  for name, ref in init_flat.items():
    shape, dtype = _shape_dtype(ref)
    if any(r.fullmatch(name) for r in init_res):
      merged[name] = ref
      report.kept_from_init.append(name)
      continue
    if name not in loaded_flat:
      missing.append(f"{name} {shape}")
      continue
    value = np.asarray(loaded_flat[name])
    if value.shape != shape:
      if name.endswith(POSEMB_SUFFIX) and value.ndim == 3 and len(shape) == 3 and \
          value.shape[0] == shape[0] == 1 and value.shape[2] == shape[2]:
        new_prefix = 1 if has_cls_init else 0
        new_n = shape[1] - new_prefix
        side = math.isqrt(new_n)
        try:
          if side * side != new_n:
            raise CheckpointError(f"the model's {new_n} position tokens are not a square grid")
          value = resize_posemb(value, (side, side),
                                num_prefix_tokens=1 if has_cls_loaded else 0,
                                new_prefix_tokens=new_prefix, method=posemb_resize)
        except CheckpointError as e:
          mismatched.append(f"{name}: checkpoint {tuple(loaded_flat[name].shape)} vs model "
                            f"{shape} (cannot resize: {e})")
          continue
        report.resized[name] = (tuple(loaded_flat[name].shape), shape)
      else:
        mismatched.append(f"{name}: checkpoint {value.shape} vs model {shape}")
        continue
    if value.dtype != dtype:
      report.cast[name] = (str(value.dtype), str(dtype))
      value = value.astype(dtype)
    merged[name] = value
    report.loaded.append(name)

  unexpected = []
  kept = set(report.kept_from_init)
  for name in loaded_flat:
    if name in init_flat:
      if name in kept:
        report.ignored[name] = "init_only: kept the freshly initialised value"
      continue
    if any(r.fullmatch(name) for r in init_res):
      report.ignored[name] = "matches init_only (not in the model)"
    elif any(r.fullmatch(name) for r in ignore_res):
      report.ignored[name] = "matches ignore_unexpected"
    else:
      unexpected.append(f"{name} {tuple(np.shape(loaded_flat[name]))}")

  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing from the checkpoint (add to init_only to keep the "
                   f"init): " + ", ".join(missing))
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected in the checkpoint (add to ignore_unexpected "
                   f"to drop): " + ", ".join(unexpected))
    if mismatched:
      parts.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched))
    raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(parts))
  return unflatten(merged), report


def merge_lora(params: Mapping[str, Any], *, scale: float) -> dict[str, Any]:
  """Folds every ``lora/{a,b}`` into its sibling kernel and drops the LoRA subtree.

  ``kernel' = kernel + scale * a ⋅ b`` (contracting the rank axis; ``a`` is
  ``in_shape + (r,)`` and ``b`` is ``(r,) + out_shape``, as ``idat_jax.models`` lays them out),
  so the merged model computes the same function as the unmerged one, without the extra
  matmuls. ``scale`` is the model's ``LoraConfig.scale`` (it is not stored in the parameters,
  so it is required). The sum is formed in float64 and cast back to the kernel's dtype.
  """
  def merge(node):
    if not isinstance(node, Mapping):
      return node
    out = {k: merge(v) for k, v in node.items() if k != "lora"}
    if "lora" in node:
      if "kernel" not in node:
        raise CheckpointError("found a 'lora' subtree without a sibling 'kernel'")
      a = np.asarray(node["lora"]["a"], np.float64)
      b = np.asarray(node["lora"]["b"], np.float64)
      kernel = np.asarray(node["kernel"])
      delta = np.tensordot(a, b, axes=([a.ndim - 1], [0])) * scale
      if delta.shape != kernel.shape:
        raise CheckpointError(f"LoRA update shape {delta.shape} does not match kernel "
                              f"{kernel.shape}")
      out["kernel"] = (kernel.astype(np.float64) + delta).astype(kernel.dtype)
    return out
  return merge(params)
