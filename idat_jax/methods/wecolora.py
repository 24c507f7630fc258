"""WeCoLoRA: weight-copied student + LoRA feature distillation, then linear probing.

``wecolora`` (methods.md B.3-B.7): the student keeps the teacher's blocks ``0, r, 2r, ...``
(patch embedding, class token, position embedding and final norm copied too), all copied
weights frozen, LoRA on the kept blocks. Loss: mean L1 between the teacher's and the
student's last-block outputs before the final norm, over all tokens; the teacher runs in the
same jit step under ``stop_gradient``. Baselines: ``weco_kd`` (copied student trained fully,
loss after the final norm) and ``no_copy`` (random shallow student, same loss as weco_kd).

``linear_probe`` (B.9): a frozen backbone (teacher, or teacher + a distilled student's
weights) gives the class token after the final norm; BatchNorm without affine (torch's
running-variance rule) + a linear head train with LARS. Features are computed once and cached
on the device when the data set's train transform is deterministic, and the backbone runs per
step on streamed, augmented images when it is random (ChestX-ray14, RESISC45), as in the
reference. Multi-label sets train with BCE and report mean AUROC.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from idat_jax import checkpoints as ckpt_io
from idat_jax.data import features as feature_cache
from idat_jax.data import inputs, multilabel_csv, preprocess, probe_transforms
from idat_jax.data.base import Source
from idat_jax.data.host_batches import StreamingTrainIterator
from idat_jax.data.loader import MULTILABEL_BACKENDS
from idat_jax.errors import ConfigError
from idat_jax.methods import losses
from idat_jax.methods.base import (Method, ModelSpec, Params, build_model, check_lora_rank,
                                   register)
from idat_jax.checkpoints import merge_lora
from idat_jax.models import PEFT_PATTERN, variant_kwargs
from idat_jax.tree_util import flatten, unflatten

STUDENTS = ("lora", "weco_kd", "no_copy")
DISTILL_LOSSES = ("last", "segments")
FEATURES = ("auto", "pre_norm", "post_norm")


def teacher_depth(mcfg: ml_collections.ConfigDict) -> int:
  depth = mcfg.depth if mcfg.depth is not None else variant_kwargs(mcfg.variant).get("depth")
  if not depth:
    raise ConfigError("the teacher's depth is unknown: set models.teacher.variant or .depth")
  return int(depth)


def kept_block_count(depth: int, reduction: int) -> int:
  if reduction < 1:
    raise ConfigError(f"reduction factor r={reduction} must be >= 1 (r keeps blocks 0, r, 2r, ...)")
  if depth < 1:
    raise ConfigError(f"the teacher has {depth} blocks: weight copy leaves no block")
  return len(range(0, depth, reduction))


def segment_ends(student_depth: int, reduction: int, teacher_blocks: int) -> list[int]:
  """Teacher block matched with student block k: the end of segment k, r*k + r - 1.

  The reference indexes ``teacher[1::r]``, which is the segment end only for r = 2; this is
  the consistent form for every r (clamped to the teacher's last block).
  """
  return [min(reduction * k + reduction - 1, teacher_blocks - 1) for k in range(student_depth)]


def _updated(mcfg: ml_collections.ConfigDict, **updates) -> ml_collections.ConfigDict:
  """An unlocked copy of a config block with some fields replaced."""
  out = ml_collections.ConfigDict(mcfg.to_dict())
  for key, value in updates.items():
    out[key] = value
  return out


@register
class WeCoLoRA(Method):
  name = "wecolora"
  eval_model = None

  def __init__(self, config):
    super().__init__(config)
    w = config.wecolora
    if w.student not in STUDENTS:
      raise ConfigError(f"unknown wecolora.student {w.student!r}; expected one of {STUDENTS}")
    if w.loss not in DISTILL_LOSSES:
      raise ConfigError(f"unknown wecolora.loss {w.loss!r}; expected one of {DISTILL_LOSSES}")
    if w.feature not in FEATURES:
      raise ConfigError(f"unknown wecolora.feature {w.feature!r}; expected one of {FEATURES}")
    self.teacher_blocks = teacher_depth(config.models.teacher)
    self.student_blocks = kept_block_count(self.teacher_blocks, w.reduction)
    width = config.models.teacher.width or variant_kwargs(config.models.teacher.variant)["width"]
    if w.student == "lora":  # the student is the teacher's blocks: the teacher's width
      check_lora_rank(config.models.student.tuning.lora_rank, width,
                      "models.student.tuning.lora_rank")

  @property
  def feature_point(self) -> str:
    w = self.config.wecolora
    if w.feature != "auto":
      return w.feature
    return "pre_norm" if w.student == "lora" else "post_norm"

  def models(self) -> dict[str, ModelSpec]:
    c, w = self.config, self.config.wecolora
    tcfg = c.models.teacher
    image_size = c.data.image_size
    teacher, _ = build_model(_updated(tcfg, tuning=_updated(tcfg.tuning, mode="full")),
                             num_classes=0, image_size=image_size)
    no_head = ("head/.*", "pre_logits/.*")
    specs = {"teacher": ModelSpec(teacher, tcfg.checkpoint, [(".*", False)],
                                  ignore_unexpected=no_head, num_heads=teacher.num_heads)}
    mode = "lora" if w.student == "lora" else "full"
    scfg = _updated(tcfg, depth=self.student_blocks, drop_path=c.models.student.drop_path,
                        tuning=_updated(c.models.student.tuning, mode=mode,
                                            train_head=False))
    student, rules = build_model(scfg, num_classes=0, image_size=image_size, name="student")
    copy = w.student != "no_copy"
    specs["student"] = ModelSpec(
        student, tcfg.checkpoint if copy else "", rules,
        init_only=(PEFT_PATTERN,), ignore_unexpected=no_head,
        load_transform=(lambda tree: ckpt_io.copy_blocks(tree, w.reduction)) if copy else None,
        num_heads=student.num_heads)
    return specs

  def loss(self, params: Mapping[str, Params], batch, rng, extra):
    specs = self.specs
    images = batch["image"]
    t = specs["teacher"].module.apply({"params": params["teacher"]}, images, train=False,
                                      features=True)
    t = jax.lax.stop_gradient(t)
    s = specs["student"].module.apply({"params": params["student"]}, images, train=True,
                                      features=True, rngs={"dropout": rng})
    w = self.config.wecolora
    if self.feature_point == "post_norm":
      if w.loss == "segments":
        raise ConfigError("wecolora.loss='segments' compares block outputs (pre_norm features)")
      loss = losses.l1_features(s["tokens"], t["tokens"])
    elif w.loss == "last":
      loss = losses.l1_features(s["blocks"][-1], t["blocks"][-1])
    else:
      ends = segment_ends(len(s["blocks"]), w.reduction, len(t["blocks"]))
      loss = sum(losses.l1_features(s["blocks"][k], t["blocks"][j])
                 for k, j in enumerate(ends)) / len(ends)
    return loss, {"loss": loss}, extra

  def describe(self) -> dict[str, Any]:
    """What was distilled from what, on which images (path, few-shot fraction, count)."""
    c, w = self.config, self.config.wecolora
    d = c.data
    if d.backend.startswith("tfds"):
      data = f"tfds:{d.task}" + (f" ({d.tfds_data_dir})" if d.tfds_data_dir else "")
    else:
      data = d.root or d.task
    out = {"task": "distill", "data": data, "data_split": d.train_split,
           "few_shot_ratio": d.few_shot_ratio, "student": w.student, "reduction": w.reduction,
           "teacher": c.models.teacher.checkpoint, "distill_loss": w.loss}
    if w.student == "lora":
      t = c.models.student.tuning
      out.update(lora_rank=t.lora_rank, lora_targets=(
          t.lora_targets if isinstance(t.lora_targets, str) else ",".join(t.lora_targets)))
    if self.train_examples is not None:
      out["train_images"] = int(self.train_examples)
    return out

  def checkpoint_meta(self) -> dict[str, Any]:
    w = self.config.wecolora
    return {"wecolora": {"reduction": w.reduction, "teacher_blocks": self.teacher_blocks,
                         "student_blocks": self.student_blocks, "student": w.student,
                         "lora_scale": self.config.models.student.tuning.lora_scale}}

  def finalize(self, params: Mapping[str, Params], workdir: str) -> dict[str, Any]:
    if not self.config.wecolora.export_merged:
      return {}
    path = os.path.join(workdir, "student_merged.npz")
    ckpt_io.export_npz(params["student"], path, merge_lora=True,
                       lora_scale=self.config.models.student.tuning.lora_scale)
    return {"student_npz": path}


# ---------------------------------------------------------------------------------------------
# Linear probing.


def timm_trunc_normal(std: float) -> Callable:
  """timm's ``trunc_normal_(std=std)``: cut at +-2 in *absolute* value, so for small std it
  is an untruncated N(0, std^2) (flax's default cuts at +-2 std, giving std 0.88 * std)."""
  return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


class ProbeBatchNorm(nn.Module):
  """``torch.nn.BatchNorm1d(affine=False)`` over the batch axis, in float32.

  Training normalises with the biased batch variance and updates the running variance with
  the *unbiased* one (x n/(n-1)), as torch does; flax's ``nn.BatchNorm`` uses the biased one
  for both, which shifts the evaluation-time scale (0.2% at batch 512, more at small batches).
  ``momentum`` is flax's (0.9 == torch's 0.1). Statistics live in ``batch_stats/{mean,var}``.
  """
  momentum: float = 0.9
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(jnp.float32)
    dim = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((dim,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((dim,), jnp.float32))
    if not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      n = x.shape[0]
      if n < 2 and not self.is_initializing():
        raise ValueError(f"probe BatchNorm in training needs a batch of at least 2, got {n} "
                         "(torch's BatchNorm1d refuses it too): raise batch_size")
      mean = jnp.mean(x, axis=0)
      var = jnp.mean(jnp.square(x - mean), axis=0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * var * (n / (n - 1))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class ProbeHead(nn.Module):
  """MAE's probe: BatchNorm without affine (eps 1e-6, torch momentum 0.1) + linear head.

  The head's weight is timm's ``trunc_normal_(std=0.01)`` (MoCo v3), its bias zero.
  """
  num_classes: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ProbeBatchNorm(momentum=0.9, epsilon=1e-6, name="bn")(x, train=train)
    return nn.Dense(self.num_classes, kernel_init=timm_trunc_normal(self.init_std),
                    name="head")(x)


def _depth_of(tree: Params) -> int:
  blocks = [k for k in tree.get("Transformer", {}) if k.startswith("encoderblock_")]
  if not blocks:
    raise ValueError("the teacher checkpoint has no Transformer/encoderblock_* parameters")
  return len(blocks)


POSEMB = "Transformer/posembed_input/pos_embedding"


def _shape_difference(name: str, distilled: tuple, copied: tuple) -> str:
  """In words, what a parameter's two shapes say differs between the two models."""
  if len(distilled) != len(copied):
    return "another layout"
  if distilled[-1] != copied[-1] and name.endswith(("kernel", "bias", "scale", "embedding")):
    return f"width {distilled[-1]} vs {copied[-1]}"
  return "another architecture (width, heads, MLP size or patch size)"


def _posemb_mismatch(copied: np.ndarray, distilled: np.ndarray) -> str | None:
  """None when the distilled position table is the copied one resized to another image size
  (same width, a class token and a square patch grid, as resize_posemb makes it); else what
  differs."""
  if distilled.ndim != 3 or distilled.shape[-1] != copied.shape[-1]:
    return (f"{POSEMB}: checkpoint {distilled.shape} vs student {copied.shape} (width "
            f"{distilled.shape[-1]} vs {copied.shape[-1]}: another teacher architecture)")
  side = math.isqrt(distilled.shape[1] - 1)
  if side * side != distilled.shape[1] - 1:
    return (f"{POSEMB}: checkpoint {distilled.shape} is not a class token plus a square patch "
            f"grid, so it cannot be resized to the student's {copied.shape}")
  return None


def load_distilled_student(teacher: Params, reduction: int, student_run: str,
                           step: int | None = None, lora_scale: float = 1.0) -> Params:
  """Teacher tree -> weight-copied student, with a distillation run's weights merged in.

  ``student_run`` is a ``wecolora`` work dir (its Orbax checkpoint holds the student's trainable
  tree: LoRA matrices, or every weight for weco_kd); '' gives the copied, undistilled student.
  """
  student = ckpt_io.copy_blocks(teacher, reduction) if reduction > 1 else teacher
  if not student_run:
    return student
  state, meta = ckpt_io.read_run_checkpoint(os.path.join(student_run, "checkpoints"), step)
  facts = meta.get("wecolora")
  if facts is None:
    raise ValueError(f"{student_run} is not a wecolora distillation run (its checkpoint meta has "
                     f"no 'wecolora' entry; method {meta.get('method')!r})")
  teacher_blocks = len(ckpt_io.kept_blocks(_depth_of(teacher), 1))
  if facts["reduction"] != reduction or facts["teacher_blocks"] != teacher_blocks:
    raise ValueError(
        f"the distilled checkpoint in {student_run} does not match the student: it was "
        f"distilled with reduction r={facts['reduction']} from a {facts['teacher_blocks']}-block "
        f"teacher, the probe asks for r={reduction} of a {teacher_blocks}-block teacher")
  if facts.get("lora_scale", lora_scale) != lora_scale:
    raise ValueError(f"{student_run} was distilled with LoRA scale {facts['lora_scale']}, the "
                     f"probe merges with {lora_scale} (models.student.tuning.lora_scale)")
  trained = state["trainable"].get("student")
  if not trained:
    raise ValueError(f"{student_run}: the checkpoint holds no 'student' parameters")
  base = flatten(student)
  lora = {k: v for k, v in flatten(trained).items() if "/lora/" in k}
  rest = {k: v for k, v in flatten(trained).items() if "/lora/" not in k}
  problems = []
  for name, value in rest.items():
    if name not in base:
      problems.append(f"{name} is not a parameter of the r={reduction} student")
    elif name == POSEMB and base[name].shape != value.shape:
      # A student distilled at another image size than the teacher file's native one trained
      # its own (resized) table: that table is the student's, and the model's image size is
      # reached by the usual resize when the tree is merged. Compare after resizing.
      problem = _posemb_mismatch(base[name], value)
      if problem:
        problems.append(problem)
    elif base[name].shape != value.shape:
      problems.append(f"{name}: checkpoint {value.shape} vs student {base[name].shape} "
                      f"({_shape_difference(name, value.shape, base[name].shape)})")
  for name, value in lora.items():
    kernel = name.split("/lora/")[0] + "/kernel"
    if kernel not in base:
      problems.append(f"{name}: no projection {kernel} in the r={reduction} student")
    elif name.endswith("/a") and value.shape[:-1] != base[kernel].shape[:value.ndim - 1]:
      problems.append(f"{name}: shape {value.shape} does not fit kernel {base[kernel].shape}")
  if problems:
    raise ValueError(f"the distilled checkpoint in {student_run} does not match the r={reduction} "
                     "student copied from the teacher file (was it distilled from another "
                     "teacher?): " + "; ".join(problems[:8]))
  base.update(rest)
  base.update(lora)
  return merge_lora(unflatten(base), scale=lora_scale)


class ProbeTrainStream(StreamingTrainIterator):
  """Streamed probe training images under a data set's random train transform (e.g. CXR's
  flip + ColorJitter), drawn from (seed, epoch, example index) like the distillation's crops."""

  def __init__(self, source, image_size: int, global_batch: int, mesh, *, seed: int,
               transform: Callable[[Any, int, Any], Any]):
    super().__init__(source, image_size, global_batch, mesh, seed=seed, augment=True)
    self.random_transform = transform

  def _transform(self, epoch: int):
    def fn(image, index: int):
      rng = preprocess.augment_rng(self.seed, epoch, index)
      return self.random_transform(image, self.image_size, rng)
    return fn


@register
class LinearProbe(Method):
  """MAE/WeCoLoRA linear probe of a frozen backbone (B.9), single- or multi-label.

  ``probe.transform`` names the data set's preprocessing (``data/probe_transforms.py``). When
  its train transform is deterministic (resize + centre crop), every example goes through the
  backbone once and the head trains on cached features, as the reference does for ImageNet
  and iNaturalist. When it is random (ChestX-ray14's flip + ColorJitter, RESISC45's random
  crops) the reference runs the backbone on freshly augmented images at every step, so the
  images are streamed and the frozen backbone runs inside the train step (unless
  ``probe.train_augment=False``, which caches features of the eval transform instead).
  Multi-label backends (ChestX-ray14, CSV) train with BCE-with-logits and report mean AUROC.
  """
  name = "linear_probe"
  eval_model = "probe"

  def __init__(self, config):
    super().__init__(config)
    p = config.probe
    if config.batch_size < 2:  # its BatchNorm's batch statistics (global over the devices)
      raise ConfigError(f"config.batch_size={config.batch_size}: the linear probe's BatchNorm "
                        "needs a batch of at least 2 (torch's BatchNorm1d refuses 1 too)")
    self.transform = probe_transforms.get(p.transform)
    self.multilabel = config.data.backend in MULTILABEL_BACKENDS
    self.eval_metric = "mean_auroc" if self.multilabel else "top1"
    self.streams = self.transform.train_random is not None and bool(p.train_augment)
    # The model whose features of every example are cached once (see ``prepare_inputs``);
    # None: images are streamed and the loss runs the backbone.
    self.features_from = None if self.streams else "backbone"
    self._train_source: Source | None = None

  def models(self) -> dict[str, ModelSpec]:
    c, p = self.config, self.config.probe
    tcfg = c.models.teacher
    depth = kept_block_count(teacher_depth(tcfg), p.reduction)
    bcfg = _updated(tcfg, depth=depth, tuning=_updated(tcfg.tuning, mode="full"))
    backbone, _ = build_model(bcfg, num_classes=0, image_size=c.data.image_size)
    if not tcfg.checkpoint:
      raise ConfigError("linear probing needs models.teacher.checkpoint (the backbone's weights)")
    specs = {"backbone": ModelSpec(
        backbone, tcfg.checkpoint, [(".*", False)],
        ignore_unexpected=("head/.*", "pre_logits/.*"), num_heads=backbone.num_heads,
        load_transform=lambda tree: load_distilled_student(
            tree, p.reduction, p.student_run, p.student_step,
            lora_scale=c.models.student.tuning.lora_scale))}
    probe = ProbeHead(self.num_classes)
    specs["probe"] = ModelSpec(probe, "", [("head/.*", True)],
                               example_input=jnp.zeros((2, backbone.width), jnp.float32))
    return specs

  def describe(self) -> dict[str, Any]:
    """The data set probed and the backbone: teacher, copied or distilled student (r, run)."""
    c, p = self.config, self.config.probe
    if p.student_run:
      backbone = "distilled"
    else:
      backbone = "teacher" if p.reduction == 1 else "copied"
    out = {"task": c.data.task, "backbone": backbone, "reduction": p.reduction,
           "student_run": p.student_run, "teacher": c.models.teacher.checkpoint,
           "probe_transform": p.transform, "train_features": "streamed" if self.streams
           else "cached"}
    if c.data.backend in ("image_folder", "chestxray", "multilabel_csv", "folder"):
      out["data"] = c.data.root
    if c.data.few_shot_ratio != 1.0:
      out["few_shot_ratio"] = c.data.few_shot_ratio
    if p.student_run and p.student_step is not None:
      out["student_step"] = p.student_step
    if self.train_examples is not None:
      out["train_images"] = int(self.train_examples)
    return out

  # -- data --------------------------------------------------------------------------------

  def source(self, split: str) -> Source:
    """A split under the probe transform's deterministic part (decoded once, cached)."""
    source = inputs.build_source(self.config, split)
    self.label_names = getattr(source, "label_names", None)
    return probe_transforms.TransformedSource(source, self.transform.eval,
                                              self.config.data.image_size, self.transform.name)

  def build_train(self, mesh: Mesh, workdir: str) -> inputs.TrainData:
    """Streamed training images under the random train transform (``self.streams``)."""
    c = self.config
    if not self.streams:
      raise ValueError("build_train is for streamed probes; this probe caches its features")
    source = inputs.build_source(c, c.data.train_split)
    self.label_names = getattr(source, "label_names", None)
    facts = inputs.data_facts(c, source)
    stream = ProbeTrainStream(source, c.data.image_size, c.batch_size, mesh, seed=c.seed,
                              transform=self.transform.train_random)
    return inputs.TrainData(facts.num_examples, facts.num_classes,
                            inputs.image_batch(c.data.normalization), stream=stream)

  def open_inputs(self, mesh: Mesh, workdir: str) -> inputs.DataFacts:
    """Both splits under the probe transform; the streamed probe builds its stream here."""
    if self.streams:
      return super().open_inputs(mesh, workdir)
    c = self.config
    self._eval_source = self.source(c.data.eval_split)
    self._train_source = self.source(c.data.train_split)
    return inputs.data_facts(c, self._train_source)

  def prepare_inputs(self, params: Mapping[str, Params], mesh: Mesh, workdir: str
                     ) -> tuple[inputs.TrainData, inputs.EvalData]:
    """Cached probes run the frozen backbone once over both splits (features stay on the
    devices); streamed ones train on images (the loss runs the backbone)."""
    if self.streams:
      return super().prepare_inputs(params, mesh, workdir)
    if self._train_source is None:
      raise RuntimeError("prepare_inputs() runs after open_inputs()")
    return feature_cache.cached_inputs(self.config, mesh, workdir, self.features, params,
                                       self._train_source, self._eval_source)

  # -- model -------------------------------------------------------------------------------

  def features(self, params: Mapping[str, Params], images: jax.Array) -> jax.Array:
    """The class token after the final norm (MAE's ``global_pool=False`` probe feature)."""
    spec = self.specs["backbone"]
    return spec.module.apply({"params": params["backbone"]}, images, train=False,
                             features=True)["pooled"].astype(jnp.float32)

  def _head_input(self, params, batch) -> jax.Array:
    if "feature" in batch:
      return batch["feature"]
    return jax.lax.stop_gradient(self.features(params, batch["image"]))

  def loss(self, params, batch, rng, extra):
    probe = self.specs["probe"].module
    logits, updated = probe.apply({"params": params["probe"], **extra["probe"]},
                                  self._head_input(params, batch), train=True,
                                  mutable=["batch_stats"])
    if self.multilabel:
      targets = multilabel_csv.unpack_labels(batch["label"], logits.shape[-1])
      loss = losses.binary_cross_entropy_with_logits(logits, targets)
      return loss, {"loss": loss}, dict(extra, probe=dict(updated))
    ce = losses.cross_entropy(logits, batch["label"])
    acc = losses.top1_correct(logits, batch["label"]).mean()
    return ce, {"loss": ce, "train_top1": acc}, dict(extra, probe=dict(updated))

  def predict(self, params, x, extra):
    """Logits from cached features ([N, D]) or from normalised images ([N, H, W, 3])."""
    probe = self.specs["probe"].module
    if x.ndim == 4:
      x = self.features(params, x)
    return probe.apply({"params": params["probe"], **extra["probe"]}, x, train=False)


def linear_probe_lr(base_lr: float, batch_size: int) -> float:
  """MAE's rule lr = blr * batch / 256."""
  return base_lr * batch_size / 256


def distill_lr(base_lr: float, batch_size: int, accum_steps: int) -> float:
  return base_lr * batch_size * accum_steps / 256

