"""The method plug-in interface: what a method declares, and what the trainer owns.

A method says which models it has (with their pretrained files, PEFT options and trainable
rules), its training loss and how it predicts. The generic trainer (``idat_jax.train``)
owns initialisation, freezing, the optimizer, sharding, the loop, checkpoints and logging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from idat_jax.models import (PEFT_PATTERN, VisionTransformer, build_vit, model_overrides,
                             trainable_rules)

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass
class ModelSpec:
  """One model of a method.

  ``checkpoint`` is a pretrained file (``.npz``, ``.safetensors``, ``.pth``) or '' for a
  random init. Parameters matching ``init_only`` are always taken from the fresh init (new
  heads, PEFT weights); ``load_transform`` rewrites the loaded tree first (e.g. WeCoLoRA's
  weight copy); ``trainable`` are ordered (regex, bool) rules, first match wins.
  """
  module: Any  # usually a VisionTransformer
  checkpoint: str
  trainable: Sequence[tuple[str, bool]]
  init_only: Sequence[str] = ()
  ignore_unexpected: Sequence[str] = ()
  load_transform: Callable[[Params], Params] | None = None
  num_heads: int | None = None
  # Input used to initialise the module (default: one image of the ViT's size).
  example_input: Any = None


class Method:
  """Base class: subclasses set ``name`` and implement ``models`` and ``loss``."""
  name: str = ""
  # The model whose predictions are evaluated (None: the method has no classifier).
  eval_model: str | None = None
  # The key of ``train.evaluate``'s result that the trainer reports as best / last
  # ('top1': top-1 %, 'mean_auroc': mean AUROC % over labels of a multi-label probe).
  eval_metric: str = "top1"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    # Training examples the run reads, when the trainer knows them (reported by describe()).
    self.train_examples: int | None = None

  def describe(self) -> dict[str, Any]:
    """The facts that identify this run in its summary and ``results.csv`` (JSON values).

    The default suits supervised tuning: the task and the student's tuning mode. Methods
    where those fields would mislead (a probe has no tuning mode; a distillation reads an
    image folder, not a task) report their own.
    """
    return {"task": self.config.data.task, "tuning": self.config.models.student.tuning.mode}

  def models(self) -> dict[str, ModelSpec]:
    raise TypeError(f"{type(self).__name__} must define models()")

  def loss(self, params: Mapping[str, Params], batch: Batch, rng: jax.Array,
           extra: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """Training loss (scalar), metrics to log, and the updated non-parameter state.

    ``params`` maps model name -> full parameter tree; ``extra`` maps model name -> the
    module's non-``params`` collections (e.g. BatchNorm statistics), ``{}`` for most methods.
    """
    raise TypeError(f"{type(self).__name__} must define loss()")

  def predict(self, params: Mapping[str, Params], images: jax.Array,
              extra: Mapping[str, Any]) -> jax.Array:
    """Logits of the evaluated model, in eval mode."""
    if self.eval_model is None:
      raise ValueError(f"method {self.name!r} has no classifier to evaluate")
    spec = self._specs()[self.eval_model]
    return spec.module.apply({"params": params[self.eval_model]}, images, train=False)

  # -- data: the trainer builds every input through these (methods may override them) ------

  def source(self, split: str):
    """The example source of one split (``idat_jax.data.base.Source``) as this method reads
    it; the linear probe wraps it with its data set's preprocessing."""
    from idat_jax.training import inputs
    return inputs.build_source(self.config, split)

  def build_train(self, mesh, workdir: str):
    """The training input (``training.inputs.TrainData``) of methods without cached features
    (the probe streams its augmented images here)."""
    from idat_jax.training import inputs
    return inputs.build_train(self.config, mesh, workdir)

  def checkpoint_meta(self) -> dict[str, Any]:
    """Facts saved with every checkpoint that readers of the run must check (JSON)."""
    return {}

  def finalize(self, params: Mapping[str, Params], workdir: str) -> dict[str, Any]:
    """Called once on process 0 after the last step (exports); returns summary entries."""
    return {}

  def _specs(self) -> dict[str, ModelSpec]:
    if not hasattr(self, "_spec_cache"):
      self._spec_cache = self.models()
    return self._spec_cache


def split_rngs(rng: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
  """Independent dropout / drop-path randomness per model."""
  keys = jax.random.split(rng, len(names))
  return {name: keys[i] for i, name in enumerate(names)}


def build_model(mcfg: ml_collections.ConfigDict, *, num_classes: int,
                image_size: int) -> tuple[VisionTransformer, list[tuple[str, bool]]]:
  """A ViT and its trainable rules from a model config block (see configs/common.py)."""
  tuning = mcfg.tuning
  overrides = model_overrides(
      tuning.mode, adapter_dim=tuning.adapter_dim, adapter_scale=tuning.adapter_scale,
      adapter_init_std=tuning.adapter_init_std, lora_rank=tuning.lora_rank,
      lora_targets=(tuning.lora_targets if isinstance(tuning.lora_targets, str)
                    else tuple(tuning.lora_targets)),
      lora_scale=tuning.lora_scale)
  arch = {k: mcfg[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")
          if mcfg.get(k) is not None}
  module = build_vit(
      mcfg.variant, num_classes, image_size=image_size, pool=mcfg.pool,
      dropout=mcfg.dropout, drop_path=mcfg.drop_path, head_init_std=mcfg.head_init_std,
      remat=mcfg.remat, attention_impl=mcfg.attention_impl,
      dtype=jnp.dtype(mcfg.dtype), **arch, **overrides)
  rules = trainable_rules(tuning.mode, train_head=tuning.train_head)
  return module, rules


def pretrained_spec(mcfg: ml_collections.ConfigDict, *, num_classes: int,
                    image_size: int) -> ModelSpec:
  """The usual transfer set-up: backbone from ``mcfg.checkpoint``, fresh head and PEFT."""
  module, rules = build_model(mcfg, num_classes=num_classes, image_size=image_size)
  return ModelSpec(
      module=module, checkpoint=mcfg.checkpoint, trainable=rules,
      init_only=("head/.*", PEFT_PATTERN),
      # The original in21k files carry a representation layer that our transfer model drops.
      ignore_unexpected=("pre_logits/.*",),
      num_heads=module.num_heads)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  _REGISTRY[cls.name] = cls
  return cls


def build_method(config: ml_collections.ConfigDict) -> Method:
  if config.method not in _REGISTRY:
    raise ValueError(f"unknown method {config.method!r}; expected one of {sorted(_REGISTRY)}")
  return _REGISTRY[config.method](config)
