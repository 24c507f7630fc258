"""Losses of the two methods, written as the reference code computes them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch (torch ``nn.CrossEntropyLoss()``)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over batch and labels of the per-label sigmoid BCE (torch ``BCEWithLogitsLoss()``),
  the multi-label probe's loss (ChestX-ray14, RSNA)."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                     targets.astype(jnp.float32)))


def logit_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """iDAT's ``mse`` distillation: mean over batch and classes of (z_s - z_t)^2."""
  return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def kl_teacher_student(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """iDAT's ``kl`` distillation: KL(p_t || p_s) at temperature T, summed over classes and
  averaged over the batch (torch ``kl_div(..., reduction='batchmean')``), with no T^2 factor.
  """
  log_ps = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps)) / student.shape[0]


def l1_features(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """WeCoLoRA's feature loss: mean |t - s| over batch, tokens and channels."""
  return jnp.mean(jnp.abs(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
