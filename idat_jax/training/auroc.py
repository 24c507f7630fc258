"""Exact ROC AUC for multi-label evaluation (ChestX-ray14's mean AUROC over 15 labels).

AUROC is computed from ranks (the Mann-Whitney U statistic), with tied scores given their
average rank. That is exactly the area under scikit-learn's ``roc_curve`` (which merges tied
scores into one threshold and integrates with the trapezoid rule, i.e. a tie counts 1/2), so
it equals ``sklearn.metrics.roc_auc_score`` up to float rounding, in O(n log n) per label.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of one binary label; NaN when only one class is present (AUC is undefined).

  ``labels`` holds 0/1 (or bool), ``scores`` any real scores (logits or probabilities: the
  AUC only depends on their order).
  """
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"{labels.shape[0]} labels for {scores.shape[0]} scores")
  if not np.all(np.isfinite(scores)):
    raise ValueError("AUROC: the scores contain NaN or infinity")
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = rankdata(scores, method="average")
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def multilabel_auroc(labels: np.ndarray, scores: np.ndarray,
                     names: Sequence[str] | None = None) -> dict[str, float]:
  """Per-label AUROC (%) of (N, L) multi-hot labels and scores, plus their mean.

  Returns ``{'mean_auroc': ..., 'auroc/<name>': ..., 'auroc_labels': k}`` in percent. A label
  with a single class in the evaluated set has no AUC: it is reported as NaN and left out of
  the mean, and ``auroc_labels`` says over how many labels the mean was taken (the reference
  averages over all 15; on the official ChestX-ray14 test split every label has both classes).
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  if labels.ndim != 2 or labels.shape != scores.shape:
    raise ValueError(f"multi-label AUROC needs (N, L) labels and scores of the same shape, got "
                     f"{labels.shape} and {scores.shape}")
  num = labels.shape[1]
  names = list(names) if names is not None else [str(i) for i in range(num)]
  if len(names) != num:
    raise ValueError(f"{len(names)} label names for {num} labels")
  per = [binary_auroc(labels[:, j], scores[:, j]) for j in range(num)]
  defined = [v for v in per if not np.isnan(v)]
  out = {"mean_auroc": 100.0 * float(np.mean(defined)) if defined else float("nan"),
         "auroc_labels": len(defined)}
  out.update({f"auroc/{name}": 100.0 * v for name, v in zip(names, per)})
  return out
