"""Learning-rate schedules of the reference recipes, as optax schedules (``step -> lr``).

* iDAT (docs/methods.md, section 4) uses timm's ``CosineLRScheduler`` stepped once per *epoch*: the LR is
  constant within an epoch. ``timm_cosine_epoch_lr`` reproduces timm's arithmetic in float64 for
  one integer epoch; ``per_epoch_schedule`` turns any per-epoch LR list into a jittable step
  schedule with a lookup table. ``timm_cosine_step_schedule`` is the same curve evaluated at the
  fractional epoch ``step / steps_per_epoch`` (a config option, not the reference).
* WeCoLoRA / MAE (docs/methods.md, sections 6 and 7) use a per-iteration half-cycle cosine after linear warmup
  (``half_cycle_cosine``).

Every schedule's ``step`` argument is the optimizer-update count that optax passes (with
``optax.MultiSteps`` that is the number of *accumulated* updates, not micro-batches).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jnp.ndarray | int], jnp.ndarray]


def timm_cosine_epoch_lr(epoch: int, base_lr: float, *, t_initial: int = 100,
                         warmup_epochs: int = 10, warmup_lr: float = 1e-7, min_lr: float = 1e-8,
                         warmup_prefix: bool = False, cycle_limit: int = 1,
                         cycle_decay: float = 1.0) -> float:
  """LR of epoch ``epoch`` under timm's CosineLRScheduler(t_in_epochs=True, cycle_mul=1).

  Same operations in the same order as timm's ``_get_lr``, so values agree to float64 rounding.
  With ``warmup_prefix=False`` the cosine runs on the absolute epoch (it starts below ``base_lr``
  after warmup); from cycle ``cycle_limit`` on (epochs >= t_initial for one cycle, i.e. timm's
  cooldown epochs) the LR is ``min_lr``.
  """
  if t_initial <= 0:
    raise ValueError(f"t_initial must be > 0, got {t_initial}")
  t = int(epoch)
  if warmup_epochs and t < warmup_epochs:
    warmup_step = (base_lr - warmup_lr) / warmup_epochs
    return warmup_lr + t * warmup_step
  if warmup_prefix:
    t = t - warmup_epochs
  i = t // t_initial
  t_curr = t - t_initial * i
  if i < cycle_limit:
    lr_max = base_lr * cycle_decay ** i
    return min_lr + 0.5 * (lr_max - min_lr) * (1 + math.cos(math.pi * t_curr / t_initial))
  return min_lr


def timm_cosine_epoch_lrs(num_epochs: int, base_lr: float, **kwargs) -> np.ndarray:
  """Per-epoch LRs ``[lr(0), ..., lr(num_epochs - 1)]`` (float64), e.g. for logging."""
  return np.array([timm_cosine_epoch_lr(e, base_lr, **kwargs) for e in range(num_epochs)])


def per_epoch_schedule(epoch_lrs: Callable[[int], float] | Sequence[float] | np.ndarray,
                       steps_per_epoch: int, num_epochs: int | None = None) -> Schedule:
  """Piecewise-constant step schedule: step ``s`` gets the LR of epoch ``s // steps_per_epoch``.

  This is what a torch loop does when it calls ``scheduler.step(epoch + 1)`` after each epoch.
  ``epoch_lrs`` is a per-epoch array, or a function of the epoch (then ``num_epochs`` is needed).
  Steps past the table keep the last epoch's LR.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
  if callable(epoch_lrs):
    if num_epochs is None:
      raise ValueError("num_epochs is required when epoch_lrs is a function")
    values = [epoch_lrs(e) for e in range(num_epochs)]
  else:
    values = list(np.asarray(epoch_lrs, dtype=np.float64).reshape(-1))
    if num_epochs is not None and num_epochs != len(values):
      raise ValueError(f"num_epochs={num_epochs} but {len(values)} per-epoch LRs were given")
  if not values:
    raise ValueError("per_epoch_schedule needs at least one epoch")
  table = jnp.asarray(np.asarray(values, dtype=np.float32))

  def schedule(step):
    epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
    return jnp.take(table, epoch, mode="clip")

  return schedule


def timm_cosine_step_schedule(base_lr: float, *, steps_per_epoch: int, t_initial: int = 100,
                              warmup_epochs: int = 10, warmup_lr: float = 1e-7,
                              min_lr: float = 1e-8, warmup_prefix: bool = False,
                              cycle_limit: int = 1, cycle_decay: float = 1.0) -> Schedule:
  """timm's warmup + cosine evaluated at the fractional epoch ``step / steps_per_epoch``.

  Equivalent to timm with ``t_in_epochs=False`` and all epoch counts multiplied by
  ``steps_per_epoch``: the LR changes every step instead of every epoch.
  """
  if steps_per_epoch <= 0 or t_initial <= 0:
    raise ValueError("steps_per_epoch and t_initial must be > 0")

  def schedule(step):
    t = jnp.asarray(step, jnp.float32) / steps_per_epoch
    warm = warmup_lr + t * ((base_lr - warmup_lr) / max(warmup_epochs, 1))
    tc = t - warmup_epochs if warmup_prefix else t
    i = jnp.floor(tc / t_initial)
    t_curr = tc - t_initial * i
    lr_max = base_lr * jnp.power(cycle_decay, i)
    # 0.5 * (1 + cos(x)) written as cos(x / 2)^2: no float32 cancellation near the end.
    cos = min_lr + (lr_max - min_lr) * jnp.square(jnp.cos(0.5 * jnp.pi * t_curr / t_initial))
    after = jnp.where(i < cycle_limit, cos, min_lr)
    if warmup_epochs:
      return jnp.where(t < warmup_epochs, warm, after)
    return after

  return schedule


def timm_cosine_schedule(base_lr: float, *, steps_per_epoch: int, num_epochs: int,
                         per_step: bool = False, **kwargs) -> Schedule:
  """The iDAT schedule: per-epoch (reference, default) or per-step timm warmup + cosine.

  ``num_epochs`` is the length of the run including timm's cooldown epochs (100 + 10 in iDAT);
  ``kwargs`` are those of ``timm_cosine_epoch_lr``.
  """
  if per_step:
    return timm_cosine_step_schedule(base_lr, steps_per_epoch=steps_per_epoch, **kwargs)
  return per_epoch_schedule(timm_cosine_epoch_lrs(num_epochs, base_lr, **kwargs), steps_per_epoch)


def half_cycle_cosine_lr(t: float, base_lr: float, *, epochs: float, warmup_epochs: float,
                         min_lr: float = 0.0, linear: bool = False) -> float:
  """MAE's ``adjust_learning_rate`` at fractional epoch ``t`` (plain Python, for tests/logging).

  ``linear=True`` decays linearly from ``base_lr`` to ``min_lr``. (MAE/WeCoLoRA's own
  ``--linear_lr_sched`` branch computes ``min + (lr - min)·(t - w)/(E - w)``, a ramp *up* from
  ``min_lr`` after warmup; we read that as a bug and implement the decay the flag's name says.)
  """
  t = min(float(t), float(epochs))
  if t < warmup_epochs:
    return base_lr * t / warmup_epochs
  frac = (t - warmup_epochs) / (epochs - warmup_epochs)
  if linear:
    return min_lr + (base_lr - min_lr) * (1.0 - frac)
  return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def half_cycle_cosine(base_lr: float, *, epochs: float, warmup_epochs: float,
                      steps_per_epoch: int, min_lr: float = 0.0, linear: bool = False,
                      accum_steps: int = 1,
                      micro_batches_per_epoch: int | None = None) -> Schedule:
  """WeCoLoRA/MAE per-iteration schedule: linear warmup, then half-cycle cosine (or linear) decay.

  By default ``t = step / steps_per_epoch``. MAE evaluates the LR once per accumulation window at
  ``t = epoch + it / len(loader)`` where ``it`` counts micro-batches and leftover micro-batches
  are dropped; pass ``micro_batches_per_epoch`` and ``accum_steps`` to reproduce that exactly
  (then ``steps_per_epoch`` must equal ``micro_batches_per_epoch // accum_steps``).
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
  if epochs <= warmup_epochs:
    raise ValueError(f"epochs ({epochs}) must exceed warmup_epochs ({warmup_epochs})")
  if micro_batches_per_epoch is not None:
    if micro_batches_per_epoch // accum_steps != steps_per_epoch:
      raise ValueError(
          f"steps_per_epoch={steps_per_epoch} but {micro_batches_per_epoch} micro-batches "
          f"accumulated {accum_steps} at a time give {micro_batches_per_epoch // accum_steps}")
    step_fraction = accum_steps / micro_batches_per_epoch
  else:
    step_fraction = 1.0 / steps_per_epoch

  # Hand-written rather than optax.warmup_cosine_decay_schedule: (1) the reference's LR is a
  # function of the fractional epoch t = epoch + it / len(loader), not of the step count, and
  # (2) optax's 0.5 (1 + cos) form cancels in float32 near the end of the cycle (3e-5 relative
  # error at lr 1e-6, measured against the reference's float64), where cos^2 stays at 1e-7.
  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    epoch, k = step // steps_per_epoch, step % steps_per_epoch
    t = epoch.astype(jnp.float32) + k.astype(jnp.float32) * step_fraction
    t = jnp.minimum(t, epochs)
    frac = (t - warmup_epochs) / (epochs - warmup_epochs)
    if linear:
      decay = min_lr + (base_lr - min_lr) * (1.0 - frac)
    else:
      decay = min_lr + (base_lr - min_lr) * jnp.square(jnp.cos(0.5 * jnp.pi * frac))
    if warmup_epochs > 0:
      return jnp.where(t < warmup_epochs, base_lr * t / warmup_epochs, decay)
    return decay

  return schedule
