"""Supervised classification methods: iDAT and the single-model baselines.

* ``supervised``: one model, cross-entropy. With ``tuning.mode`` it is adapter-tuning alone,
  linear probe, full fine-tuning (also from scratch: no checkpoint), LoRA, SSF or BitFit.
* ``idat``: a large student and a small teacher trained jointly on
  ``CE(student) + CE(teacher) + D(student, teacher)`` (methods.md A.4). Gradients flow into
  both models through every term (no stop-gradient, as in the reference). The reference's
  double backward gives the teacher twice this gradient; AdamW is invariant to that constant
  factor up to eps, so we take the plain joint gradient.
"""

from __future__ import annotations

from typing import Mapping

import jax

from idat_jax.errors import ConfigError
from idat_jax.methods import losses
from idat_jax.methods.base import Method, ModelSpec, Params, pretrained_spec, register, split_rngs


@register
class Supervised(Method):
  name = "supervised"
  eval_model = "student"

  def models(self) -> dict[str, ModelSpec]:
    c = self.config
    return {"student": pretrained_spec(c.models.student, num_classes=self.num_classes,
                                       image_size=c.data.image_size, name="student")}

  def loss(self, params: Mapping[str, Params], batch, rng, extra):
    spec = self.specs["student"]
    logits = spec.module.apply({"params": params["student"]}, batch["image"], train=True,
                               rngs={"dropout": rng})
    ce = losses.cross_entropy(logits, batch["label"])
    acc = losses.top1_correct(logits, batch["label"]).mean()
    return ce, {"loss": ce, "ce_student": ce, "train_top1": acc}, extra


DISTILL_LOSSES = ("mse", "kl")


@register
class IDAT(Method):
  name = "idat"
  eval_model = "student"

  def __init__(self, config):
    super().__init__(config)
    if config.idat.distill_loss not in DISTILL_LOSSES:
      raise ConfigError(f"unknown idat.distill_loss {config.idat.distill_loss!r}; "
                        f"expected one of {DISTILL_LOSSES}")

  def models(self) -> dict[str, ModelSpec]:
    c = self.config
    kw = dict(num_classes=self.num_classes, image_size=c.data.image_size)
    return {"student": pretrained_spec(c.models.student, name="student", **kw),
            "teacher": pretrained_spec(c.models.teacher, name="teacher", **kw)}

  def distillation(self, z_s: jax.Array, z_t: jax.Array) -> jax.Array:
    c = self.config.idat
    if c.distill_loss == "mse":
      return losses.logit_mse(z_s, z_t)
    return losses.kl_teacher_student(z_s, z_t, c.temperature)

  def loss(self, params: Mapping[str, Params], batch, rng, extra):
    specs = self.specs
    rngs = split_rngs(rng, ("student", "teacher"))
    logits = {
        name: specs[name].module.apply({"params": params[name]}, batch["image"], train=True,
                                       rngs={"dropout": rngs[name]})
        for name in ("student", "teacher")}
    ce_s = losses.cross_entropy(logits["student"], batch["label"])
    ce_t = losses.cross_entropy(logits["teacher"], batch["label"])
    distill = self.distillation(logits["student"], logits["teacher"])
    c = self.config.idat
    total = c.student_weight * ce_s + c.teacher_weight * ce_t + c.distill_weight * distill
    return total, {
        "loss": total, "ce_student": ce_s, "ce_teacher": ce_t, "distill": distill,
        "train_top1": losses.top1_correct(logits["student"], batch["label"]).mean(),
        "train_top1_teacher": losses.top1_correct(logits["teacher"], batch["label"]).mean(),
    }, extra
