"""The method plug-in interface: what a method declares, and what the trainer owns.

A method says which models it has (with their pretrained files, PEFT options and trainable
rules), its inputs, its training loss and how it predicts. The generic trainer
(``idat_jax.train``) owns initialisation, freezing, the optimizer, sharding, the loop,
checkpoints and logging, and calls the method only through the hooks below:

1. ``open_inputs(mesh, workdir)``: before any model exists, open every split and return the
   training split's :class:`DataFacts`; the trainer then sets ``num_classes`` and
   ``train_examples`` on the method (``set_data_facts``);
2. ``specs`` (built once from ``models()``): the models, initialised and loaded by the trainer;
3. ``prepare_inputs(params, mesh, workdir)``: the train and eval inputs, which may use the
   loaded weights (the linear probe caches its backbone's features here);
4. ``loss`` / ``predict`` inside the jitted steps; ``describe``, ``checkpoint_meta``,
   ``finalize`` around the run.

The defaults read images as ``config.data`` describes them (``idat_jax.data.inputs``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from idat_jax.data import inputs
from idat_jax.data.base import Source
from idat_jax.data.inputs import DataFacts, EvalData, TrainData
from idat_jax.errors import ConfigError
from idat_jax.models import (PEFT_PATTERN, VisionTransformer, build_vit, model_overrides,
                             trainable_rules, variant_kwargs)

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
  """Base class: subclasses set ``name`` and implement ``models`` and ``loss``.

  Image methods need nothing else; methods with other inputs override ``open_inputs`` and
  ``prepare_inputs`` (see the module docstring).
  """
  name: str = ""
  # The model whose predictions are evaluated (None: the method has no classifier).
  eval_model: str | None = None
  # The key of ``train.evaluate``'s result that the trainer reports as best / last
  # ('top1': top-1 %, 'mean_auroc': mean AUROC % over labels of a multi-label probe).
  eval_metric: str = "top1"
  # Per-label names of a multi-label eval metric (None: the labels' indices).
  label_names: list[str] | None = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    # The data's class count: the user's config.data.num_classes until the data is opened,
    # then the training split's (inputs.data_facts checks that they agree); models() reads it.
    self.num_classes: int | None = config.data.num_classes
    # Training examples the run reads, when the trainer knows them (reported by describe()).
    self.train_examples: int | None = None
    self._eval_source: Source | None = None
    self._train_data: TrainData | None = None

  def describe(self) -> dict[str, Any]:
    """The facts that identify this run in its summary and ``results.csv`` (JSON values).

    The default suits supervised tuning: the task and the student's tuning mode. Methods
    where those fields would mislead (a probe has no tuning mode; a distillation reads an
    image folder, not a task) report their own.
    """
    return {"task": self.config.data.task, "tuning": self.config.models.student.tuning.mode}

  def models(self) -> dict[str, ModelSpec]:
    raise TypeError(f"{type(self).__name__} must define models()")

  @functools.cached_property
  def specs(self) -> dict[str, ModelSpec]:
    """The method's models (name -> :class:`ModelSpec`), built once from ``models()``."""
    return self.models()

  def loss(self, params: Mapping[str, Params], batch: Batch, rng: jax.Array,
           extra: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """Training loss (scalar), metrics to log, and the updated non-parameter state.

    ``params`` maps model name -> full parameter tree; ``extra`` maps model name -> the
    module's non-``params`` collections (e.g. BatchNorm statistics), ``{}`` for most methods.
    ``batch`` is what the training input's ``model_batch`` made (normalised images by default).
    """
    raise TypeError(f"{type(self).__name__} must define loss()")

  def predict(self, params: Mapping[str, Params], images: jax.Array,
              extra: Mapping[str, Any]) -> jax.Array:
    """Logits of the evaluated model, in eval mode (input: the eval input's ``model_input``)."""
    if self.eval_model is None:
      raise ValueError(f"method {self.name!r} has no classifier to evaluate")
    spec = self.specs[self.eval_model]
    return spec.module.apply({"params": params[self.eval_model]}, images, train=False)

  # -- inputs: the trainer builds every input through these hooks --------------------------

  def source(self, split: str) -> Source:
    """The example source of one split (``idat_jax.data.base.Source``) as this method reads
    it; the linear probe wraps it with its data set's preprocessing."""
    return inputs.build_source(self.config, split)

  def build_train(self, mesh: Mesh, workdir: str) -> TrainData:
    """The training images (resident, or streamed and augmented), normalised in the step."""
    return inputs.build_train(self.config, mesh, workdir)

  def open_inputs(self, mesh: Mesh, workdir: str) -> DataFacts:
    """Before any model init: opens every split and returns the training split's facts.

    A missing split (list files, directories, TFDS metadata) thus stops the run before
    minutes of model set-up. Default: the eval split (when the method evaluates), then the
    training images (:meth:`build_train`). Overrides return ``inputs.data_facts(config,
    train_source)``, which checks a given ``config.data.num_classes`` against the data.
    """
    if self.eval_model is not None:
      self._eval_source = self.source(self.config.data.eval_split)
    self._train_data = self.build_train(mesh, workdir)
    return DataFacts(self._train_data.num_examples, self._train_data.num_classes)

  def set_data_facts(self, facts: DataFacts) -> None:
    """Called by the trainer with :meth:`open_inputs`' result, before the models are built.

    (``inputs.data_facts`` made the facts and checked a given ``config.data.num_classes``.)
    """
    self.num_classes = facts.num_classes
    self.train_examples = facts.num_examples
    self.__dict__.pop("specs", None)  # models built before now saw no data facts

  def prepare_inputs(self, params: Mapping[str, Params], mesh: Mesh,
                     workdir: str) -> tuple[TrainData, EvalData | None]:
    """With the loaded models' ``params``: the train input and the eval input (None when the
    method evaluates nothing). Default: the splits :meth:`open_inputs` opened, as images."""
    del params  # image inputs do not depend on the models
    if self._train_data is None:
      raise RuntimeError("prepare_inputs() runs after open_inputs()")
    eval_data = None
    if self._eval_source is not None:
      eval_data = inputs.build_eval(self.config, mesh, workdir, self._eval_source)
    return self._train_data, eval_data

  def checkpoint_meta(self) -> dict[str, Any]:
    """Facts saved with every checkpoint that readers of the run must check (JSON)."""
    return {}

  def finalize(self, params: Mapping[str, Params], workdir: str) -> dict[str, Any]:
    """Called once on process 0 after the last step (exports); returns summary entries."""
    return {}


def split_rngs(rng: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
  """Independent dropout / drop-path randomness per model."""
  keys = jax.random.split(rng, len(names))
  return {name: keys[i] for i, name in enumerate(names)}


def check_lora_rank(rank: Any, width: int, key: str) -> None:
  """A LoRA rank must be in ``1..width``: the update ``B A`` of a ``width``-wide projection
  has at most that rank, so a larger one only adds parameters (and memory) that learn nothing."""
  if not isinstance(rank, int) or not 1 <= rank <= width:
    raise ConfigError(f"config.{key}={rank!r}: must be an integer in 1..{width} (the width of "
                      "the ViT it adapts; a low-rank update cannot exceed the matrix rank)")


def build_model(mcfg: ml_collections.ConfigDict, *, num_classes: int, image_size: int,
                name: str | None = None) -> tuple[VisionTransformer, list[tuple[str, bool]]]:
  """A ViT and its trainable rules from a model config block (``config_lib.model_config``).

  ``name`` is the block's key under ``config.models`` (named in configuration errors).
  """
  tuning = mcfg.tuning
  if tuning.mode == "lora":
    width = mcfg.get("width") or variant_kwargs(mcfg.variant).get("width")
    if width:
      check_lora_rank(tuning.lora_rank, width,
                      f"models.{name or '<model>'}.tuning.lora_rank")
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


def pretrained_spec(mcfg: ml_collections.ConfigDict, *, num_classes: int, image_size: int,
                    name: str | None = None) -> ModelSpec:
  """The usual transfer set-up: backbone from ``mcfg.checkpoint``, fresh head and PEFT."""
  module, rules = build_model(mcfg, num_classes=num_classes, image_size=image_size, name=name)
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
    raise ConfigError(f"unknown method {config.method!r}; expected one of {sorted(_REGISTRY)}")
  return _REGISTRY[config.method](config)
