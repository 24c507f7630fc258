"""Exact AUROC against scikit-learn's roc_auc_score, ties included (issue 13, item 2)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from idat_jax.training.auroc import binary_auroc, multilabel_auroc


@pytest.mark.parametrize("seed", range(6))
def test_binary_auroc_equals_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 400))
  labels = rng.random(n) < rng.uniform(0.05, 0.6)
  labels[:2] = [True, False]
  # Coarse scores: many exact ties (logits rounded as a half-precision model would give).
  scores = np.round(rng.standard_normal(n) + labels * rng.uniform(0, 2), int(rng.integers(0, 3)))
  assert binary_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_binary_auroc_known_values():
  assert binary_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
  assert binary_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
  assert binary_auroc([1, 1, 0], [3.0, 2.0, 1.0]) == 1.0
  assert np.isnan(binary_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
  with pytest.raises(ValueError, match="NaN"):
    binary_auroc([0, 1], [0.1, np.nan])


def test_multilabel_mean_and_per_label_equal_sklearn():
  rng = np.random.default_rng(7)
  n, k = 300, 15
  labels = (rng.random((n, k)) < 0.2).astype(np.float32)
  scores = np.round(rng.standard_normal((n, k)) + 1.5 * labels, 1).astype(np.float32)
  names = [f"l{j}" for j in range(k)]
  out = multilabel_auroc(labels, scores, names)
  per = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(k)]
  for j, name in enumerate(names):
    assert out[f"auroc/{name}"] == pytest.approx(100 * per[j], abs=1e-9)
  assert out["mean_auroc"] == pytest.approx(100 * np.mean(per), abs=1e-9)
  # sklearn's macro average over labels is the same number.
  assert out["mean_auroc"] == pytest.approx(
      100 * roc_auc_score(labels, scores, average="macro"), abs=1e-9)
  assert out["auroc_labels"] == k


def test_label_with_one_class_is_left_out_of_the_mean():
  labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
  scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.4]])
  out = multilabel_auroc(labels, scores, ["a", "b"])
  assert out["mean_auroc"] == 100.0 and out["auroc_labels"] == 1
  assert np.isnan(out["auroc/b"])
