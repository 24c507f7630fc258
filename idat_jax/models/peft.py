"""Parameter-efficient tuning: configs, tuning modes and trainable rules.

Adapters live at ``Transformer/encoderblock_{i}/adapter/{down,up}``, LoRA at
``.../<projection>/lora/{a,b}`` and SSF at ``.../<module>/ssf/{scale,shift}``: new keys inside
the scope they modify, so ``pretrained tree + fresh PEFT init`` is a plain merge and the PEFT
subtree can be saved on its own. All three are carried by one frozen :class:`PeftConfig`, the
ViT's ``peft`` field, which every module that can hold PEFT weights receives. Folding LoRA
into the kernels is a tree operation of the checkpoint layer (``idat_jax.checkpoints.merge_lora``).
The equations are in docs/methods.md (sections 2 and 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging

from idat_jax import tree_util
from idat_jax.errors import ConfigError

ADAPTER_KINDS = ("gist_seq_adapter", "gist_shared_par_adapter", "adaptformer")
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")
LORA_PRESETS = {"enhanced": LORA_TARGETS, "plain": ("q", "v")}
# ``head_only``: only the classifier head trains (iDAT's ``linear_probe`` tuning mode, renamed so
# it cannot be confused with the ``linear_probe`` *method*: BatchNorm + LARS on cached features).
TUNING_MODES = ADAPTER_KINDS + ("lora", "ssf", "bitfit", "head_only", "full")
DEPRECATED_MODES = {"linear_probe": "head_only"}

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
      raise ConfigError(f"unknown adapter kind {self.kind!r}; expected one of {ADAPTER_KINDS}")
    if self.hidden_dim < 1:
      raise ConfigError(f"adapter hidden_dim must be >= 1, got {self.hidden_dim}")

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
      raise ConfigError(f"LoRA targets {self.targets} must be a non-empty subset of {LORA_TARGETS}")
    if self.rank < 1:
      raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")

  @classmethod
  def from_alpha(cls, rank: int, alpha: float, targets=LORA_TARGETS) -> "LoraConfig":
    return cls(rank=rank, targets=tuple(targets), scale=alpha / rank)


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Every parameter-efficient option of a ViT, as one immutable value.

  It is passed unchanged from the ViT down to each projection and norm, so adding an option
  touches this class and the module that uses it, not every constructor in between.
  """
  adapter: AdapterConfig | None = None
  lora: LoraConfig | None = None
  ssf: bool = False

  def lora_rank(self, target: str | None) -> int:
    """LoRA rank of the projection named ``target`` (q, k, v, out, fc1, fc2); 0 = no LoRA."""
    if self.lora is None or target is None or target not in self.lora.targets:
      return 0
    return self.lora.rank

  @property
  def lora_scale(self) -> float:
    return self.lora.scale if self.lora is not None else 1.0


NO_PEFT = PeftConfig()


def canonical_mode(mode: str) -> str:
  """The tuning mode under its current name; a deprecated name is accepted with a warning."""
  if mode in DEPRECATED_MODES:
    new = DEPRECATED_MODES[mode]
    logging.warning("tuning mode %r is deprecated (it collides with the linear_probe method); "
                    "use %r", mode, new)
    return new
  if mode not in TUNING_MODES:
    raise ConfigError(f"unknown tuning mode {mode!r}; expected one of {TUNING_MODES}")
  return mode


def model_overrides(mode: str, *, adapter_dim: int = 4, adapter_scale: float | None = None,
                    adapter_init_std: float = 0.02, lora_rank: int = 4,
                    lora_targets: tuple[str, ...] | str = "enhanced",
                    lora_scale: float = 1.0) -> dict[str, Any]:
  """The ViT keyword arguments that a tuning mode needs: ``{'peft': PeftConfig(...)}``."""
  mode = canonical_mode(mode)
  if mode in ADAPTER_KINDS:
    return dict(peft=PeftConfig(adapter=AdapterConfig(
        kind=mode, hidden_dim=adapter_dim, scale=adapter_scale, init_std=adapter_init_std)))
  if mode == "lora":
    if isinstance(lora_targets, str):
      if lora_targets not in LORA_PRESETS:
        raise ConfigError(f"unknown LoRA preset {lora_targets!r}; expected {sorted(LORA_PRESETS)}")
      lora_targets = LORA_PRESETS[lora_targets]
    return dict(peft=PeftConfig(lora=LoraConfig(
        rank=lora_rank, targets=tuple(lora_targets), scale=lora_scale)))
  if mode == "ssf":
    return dict(peft=PeftConfig(ssf=True))
  return dict(peft=NO_PEFT)


def trainable_rules(mode: str, *, train_head: bool = True) -> list[tuple[str, bool]]:
  """Ordered (regex, trainable) rules for a tuning mode (first match wins)."""
  mode = canonical_mode(mode)
  if mode == "full":
    return [(".*", True)]
  head = [("head/.*", True)] if train_head else []
  peft = {
      "lora": [(".*/lora/.*", True)],
      "ssf": [(".*/ssf/.*", True)],
      "bitfit": [(".*/bias", True)],
      "head_only": [],
  }.get(mode, [(".*/adapter/.*", True)])
  return head + peft + [(".*", False)]


def peft_subtree(params: Mapping[str, Any]) -> dict[str, Any]:
  """Only the adapter / LoRA / SSF parameters: small enough to save and share alone."""
  return tree_util.select(params, PEFT_PATTERN)

