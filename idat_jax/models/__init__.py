"""ViT models with the official checkpoint naming and PEFT hooks (one ``PeftConfig``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from idat_jax.errors import ConfigError
from idat_jax.models.peft import (ADAPTER_KINDS, DEPRECATED_MODES, LORA_PRESETS, LORA_TARGETS,
                                  NO_PEFT, PEFT_PATTERN, TUNING_MODES, AdapterConfig, LoraConfig,
                                  PeftConfig, canonical_mode, model_overrides, peft_subtree,
                                  trainable_rules)
from idat_jax.models.vit import VisionTransformer

# Width, depth, heads, MLP size of the standard variants (ViT and AugReg papers).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}
NAMED = ("Ti/16", "S/16", "S/32", "B/16", "B/32", "B/8", "L/16", "H/14")


def variant_kwargs(variant: str | None) -> dict[str, int]:
  """``'B/16'`` -> width/depth/heads/mlp/patch; ``None`` or ``'custom'`` -> {} (all explicit)."""
  if variant in (None, "", "custom"):
    return {}
  try:
    size, patch = variant.split("/")
    return dict(VARIANTS[size], patch_size=int(patch))
  except (ValueError, KeyError):
    raise ConfigError(f"unknown ViT variant {variant!r}; expected one of {NAMED} "
                      "(or any of Ti/S/B/L/H with a patch size), or 'custom' with explicit "
                      "width/depth/num_heads/mlp_dim/patch_size") from None


def build_vit(variant: str | None, num_classes: int, **overrides: Any) -> VisionTransformer:
  """The linen ViT for a named variant, with any field overridden (depth=2 for tests, ...).

  PEFT goes in as one ``peft=PeftConfig(...)`` (``model_overrides(mode, ...)`` builds it).
  """
  fields = set(VisionTransformer.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown ViT option(s) {unknown}; valid: {sorted(fields)}")
  kwargs = dict(variant_kwargs(variant), **overrides)
  if variant in (None, "", "custom"):
    missing = [k for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")
               if k not in kwargs]
    if missing:
      raise ConfigError(f"a custom ViT needs explicit {missing}")
  return VisionTransformer(num_classes=num_classes, **kwargs)


def dummy_images(model: VisionTransformer, batch: int = 1) -> jax.Array:
  return jnp.zeros((batch, model.image_size, model.image_size, 3), jnp.float32)


def init_params(model: VisionTransformer, rng: jax.Array) -> dict[str, Any]:
  """Randomly initialised parameters (shapes only need ``jax.eval_shape`` of this)."""
  return model.init(rng, dummy_images(model))["params"]


def param_shapes(model: VisionTransformer) -> dict[str, Any]:
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


__all__ = [
    "ADAPTER_KINDS", "DEPRECATED_MODES", "LORA_PRESETS", "LORA_TARGETS", "NAMED", "NO_PEFT",
    "PEFT_PATTERN", "TUNING_MODES", "VARIANTS", "AdapterConfig", "LoraConfig", "PeftConfig",
    "VisionTransformer", "build_vit", "canonical_mode", "dummy_images", "init_params",
    "model_overrides", "param_shapes", "peft_subtree", "trainable_rules", "variant_kwargs",
]
