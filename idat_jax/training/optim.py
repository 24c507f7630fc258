"""Optimizers of the reference recipes as optax transformations.

* ``adamw``: torch's AdamW (decoupled decay ``p <- p - lr*wd*p``) with timm's no-decay groups.
* ``lars``: the MoCo-v3 LARS that MAE's linear probing uses (docs/methods.md, section 7). It is not
  ``optax.lars``: MoCo-v3 multiplies the momentum buffer by the LR (``p <- p - lr*mu``), while
  optax.lars accumulates already LR-scaled updates, which differs as soon as the LR changes.
* ``with_accumulation``: gradient accumulation (mean of micro-batch gradients) via
  ``optax.MultiSteps``.

Optimizers are meant to be built on the *trainable* subtree only (see ``trainable.partition``);
masks below are computed on whatever tree the optimizer is initialised with.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

from idat_jax.training import trainable as trainable_lib

PyTree = Any
ScalarOrSchedule = float | Callable[[Any], Any]

# Leaf names of the class token and position embedding in our (Google .npz) naming.
NO_DECAY_LEAVES = ("cls", "pos_embedding")


def weight_decay_mask(params: PyTree, rule: str = "torch") -> PyTree:
  """Bool tree: True where weight decay applies.

  rule:
    'torch': timm ``param_groups_weight_decay`` as iDAT uses it: no decay for ndim <= 1, names
      ending in ``bias``, or the ``cls`` / ``pos_embedding`` leaves. Kernels, LoRA ``a``/``b``
      and adapter kernels decay.
    'mae': timm's older ``add_weight_decay`` without a skip list (WeCoLoRA): no decay for
      ndim <= 1 and ``bias`` only, so a trainable cls/pos embedding decays.
    'all' / 'none': decay everything / nothing.
    anything else: a regex full-matched against slash-joined names; matching leaves decay.
  """
  flat = trainable_lib.flatten(params)

  def torch_rule(name: str, leaf: Any) -> bool:
    return not (leaf.ndim <= 1 or name.endswith("bias")
                or name.split(trainable_lib.SEP)[-1] in NO_DECAY_LEAVES)

  def mae_rule(name: str, leaf: Any) -> bool:
    return not (leaf.ndim <= 1 or name.endswith("bias"))

  if rule == "torch":
    fn = torch_rule
  elif rule == "mae":
    fn = mae_rule
  elif rule == "all":
    fn = lambda name, leaf: True  # noqa: E731
  elif rule == "none":
    fn = lambda name, leaf: False  # noqa: E731
  else:
    try:
      pattern = re.compile(rule)
    except re.error as e:
      raise ValueError(f"weight-decay rule {rule!r} is neither a known rule "
                       f"('torch', 'mae', 'all', 'none') nor a valid regex: {e}") from e
    fn = lambda name, leaf: pattern.fullmatch(name) is not None  # noqa: E731
  return trainable_lib.unflatten({k: fn(k, v) for k, v in flat.items()})


def _resolve_mask(decay_mask: PyTree | str | Callable | None) -> PyTree | Callable:
  if decay_mask is None:
    decay_mask = "torch"
  if isinstance(decay_mask, str):
    rule = decay_mask
    return lambda params: weight_decay_mask(params, rule)
  return decay_mask


def adamw(schedule: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0,
          decay_mask: PyTree | str | Callable | None = None) -> optax.GradientTransformation:
  """``torch.optim.AdamW`` (amsgrad off): the decay is decoupled and multiplied by the LR.

  ``decay_mask``: a bool tree, a function of the params returning one, or a
  ``weight_decay_mask`` rule name/regex (default 'torch').
  """
  return optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=_resolve_mask(decay_mask))


def _matrix_mask(params: PyTree) -> PyTree:
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(schedule: ScalarOrSchedule, *, momentum: float = 0.9, weight_decay: float = 0.0,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """MoCo-v3 LARS (used by MAE linear probing).

  For ndim > 1: ``g <- g + wd*p``; ``g <- g * trust*|p|/|g|`` when both norms are > 0;
  ``mu <- momentum*mu + g``; ``p <- p - lr*mu``. ndim <= 1 (biases, norms): plain momentum SGD
  without decay or trust ratio.
  """
  return optax.chain(
      optax.masked(optax.add_decayed_weights(weight_decay), _matrix_mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _matrix_mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(schedule),
  )


def with_accumulation(tx: optax.GradientTransformation,
                      every_k: int) -> optax.GradientTransformation:
  """Applies ``tx`` once every ``every_k`` calls to the mean of the accumulated gradients.

  Intermediate calls return zero updates. Equal to one step on the mean gradient, i.e. MAE's
  ``loss / accum_iter`` accumulation when micro-batches have equal size. ``every_k == 1`` returns
  ``tx`` unchanged.
  """
  if every_k < 1:
    raise ValueError(f"every_k must be >= 1, got {every_k}")
  if every_k == 1:
    return tx
  return optax.MultiSteps(tx, every_k_schedule=every_k).gradient_transformation()
