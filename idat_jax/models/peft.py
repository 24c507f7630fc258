"""Parameter-efficient tuning: configs, tuning modes, trainable rules and LoRA merging.

Adapters live at ``Transformer/encoderblock_{i}/adapter/{down,up}``, LoRA at
``.../<projection>/lora/{a,b}`` and SSF at ``.../<module>/ssf/{scale,shift}``: new keys inside
the scope they modify, so ``pretrained tree + fresh PEFT init`` is a plain merge and the PEFT
subtree can be saved on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from idat_jax import tree_util

ADAPTER_KINDS = ("gist_seq_adapter", "gist_shared_par_adapter", "adaptformer")
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")
LORA_PRESETS = {"enhanced": LORA_TARGETS, "plain": ("q", "v")}
TUNING_MODES = ADAPTER_KINDS + ("lora", "ssf", "bitfit", "linear_probe", "full")

# Matches every PEFT parameter (used to take them from the fresh init when loading).
PEFT_PATTERN = r".*/(adapter|lora|ssf)/.*"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """iDAT's adapters (JCruan519/iDAT ``gist_*``): D -> hidden -> D with GELU and biases.

  ``scale`` defaults to 1 for the sequential adapter (applied as ``x + A(x)`` after the
  block) and to the reference's constant 0.1 for the parallel forms.
  """
  kind: str = "gist_seq_adapter"
  hidden_dim: int = 4
  scale: float | None = None
  init_std: float = 0.02

  def __post_init__(self):
    if self.kind not in ADAPTER_KINDS:
      raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {ADAPTER_KINDS}")
    if self.hidden_dim < 1:
      raise ValueError(f"adapter hidden_dim must be >= 1, got {self.hidden_dim}")

  @property
  def effective_scale(self) -> float:
    if self.scale is not None:
      return float(self.scale)
    return 1.0 if self.kind == "gist_seq_adapter" else 0.1


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA ``W x + scale * B A x`` on the named projections; the reference uses scale 1."""
  rank: int = 4
  targets: tuple[str, ...] = LORA_TARGETS
  scale: float = 1.0

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(LORA_TARGETS))
    if unknown or not self.targets:
      raise ValueError(f"LoRA targets {self.targets} must be a non-empty subset of {LORA_TARGETS}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

  @classmethod
  def from_alpha(cls, rank: int, alpha: float, targets=LORA_TARGETS) -> "LoraConfig":
    return cls(rank=rank, targets=tuple(targets), scale=alpha / rank)


def model_overrides(mode: str, *, adapter_dim: int = 4, adapter_scale: float | None = None,
                    adapter_init_std: float = 0.02, lora_rank: int = 4,
                    lora_targets: tuple[str, ...] | str = "enhanced",
                    lora_scale: float = 1.0) -> dict[str, Any]:
  """The ViT keyword arguments that a tuning mode needs (adapters, LoRA or SSF)."""
  if mode not in TUNING_MODES:
    raise ValueError(f"unknown tuning mode {mode!r}; expected one of {TUNING_MODES}")
  if mode in ADAPTER_KINDS:
    return dict(adapter=AdapterConfig(mode, adapter_dim, adapter_scale, adapter_init_std))
  if mode == "lora":
    if isinstance(lora_targets, str):
      if lora_targets not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {lora_targets!r}; expected {sorted(LORA_PRESETS)}")
      lora_targets = LORA_PRESETS[lora_targets]
    return dict(lora=LoraConfig(lora_rank, tuple(lora_targets), lora_scale))
  if mode == "ssf":
    return dict(ssf=True)
  return {}


def trainable_rules(mode: str, *, train_head: bool = True) -> list[tuple[str, bool]]:
  """Ordered (regex, trainable) rules for a tuning mode (first match wins)."""
  if mode not in TUNING_MODES:
    raise ValueError(f"unknown tuning mode {mode!r}; expected one of {TUNING_MODES}")
  if mode == "full":
    return [(".*", True)]
  head = [("head/.*", True)] if train_head else []
  peft = {
      "lora": [(".*/lora/.*", True)],
      "ssf": [(".*/ssf/.*", True)],
      "bitfit": [(".*/bias", True)],
      "linear_probe": [],
  }.get(mode, [(".*/adapter/.*", True)])
  return head + peft + [(".*", False)]


def peft_subtree(params: Mapping[str, Any]) -> dict[str, Any]:
  """Only the adapter / LoRA / SSF parameters: small enough to save and share alone."""
  return tree_util.select(params, PEFT_PATTERN)


def merge_lora(params: Mapping[str, Any], *, scale: float) -> dict[str, Any]:
  """Folds every ``lora/{a,b}`` into its sibling kernel and drops the LoRA subtree.

  ``kernel' = kernel + scale * a ⋅ b`` (contracting the rank axis), so the merged model
  computes the same function as the unmerged one, without the extra matmuls. ``scale`` is
  the model's ``LoraConfig.scale`` (it is not stored in the parameters, so it is required).
  """
  def merge(node):
    if not isinstance(node, Mapping):
      return node
    out = {k: merge(v) for k, v in node.items() if k != "lora"}
    if "lora" in node:
      if "kernel" not in node:
        raise ValueError("found a 'lora' subtree without a sibling 'kernel'")
      a = np.asarray(node["lora"]["a"], np.float64)
      b = np.asarray(node["lora"]["b"], np.float64)
      kernel = np.asarray(node["kernel"])
      delta = np.tensordot(a, b, axes=([a.ndim - 1], [0])) * scale
      if delta.shape != kernel.shape:
        raise ValueError(f"LoRA update shape {delta.shape} does not match kernel {kernel.shape}")
      out["kernel"] = (kernel.astype(np.float64) + delta).astype(kernel.dtype)
    return out
  return merge(params)
