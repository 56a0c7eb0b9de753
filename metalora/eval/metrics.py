"""Classification and regression metrics, as small typed pure functions.

Each function validates its input (same length, non-empty, the classes the metric needs) and raises a
``ValueError`` that names the problem; the arithmetic itself is scikit-learn's / scipy's reference
implementation, so the numbers are the ones papers report:

- ``accuracy``     = (1/n) Σ_i [ŷ_i = y_i]
- ``f1``           = 2·P·R / (P + R) for the positive class (``average="binary"``), or the unweighted mean
  of the per-class F1 over the classes present (``average="macro"``)
- ``matthews_corrcoef`` = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) (multi-class: Gorodkin's
  R_K statistic, as in scikit-learn); 0 when a marginal is constant
- ``pearson``      = cov(x, y) / (σ_x σ_y)
- ``auc_roc``      = P(score of a random positive > score of a random negative) (ties count ½), i.e. the
  area under the ROC curve
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.stats
import sklearn.metrics

ArrayLike = Sequence[float] | Sequence[int] | Sequence[str] | Sequence[bool] | np.ndarray

__all__ = ["accuracy", "auc_roc", "f1", "matthews_corrcoef", "pearson"]


def _pair(name: str, a: ArrayLike, b: ArrayLike, a_name: str, b_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays of equal, non-zero length, or a ValueError naming the problem."""
    x, y = np.asarray(a), np.asarray(b)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{name}: {a_name} and {b_name} must be 1-D, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}: length mismatch, {a_name} has {len(x)} items but {b_name} has {len(y)}")
    if len(x) == 0:
        raise ValueError(f"{name}: empty input")
    return x, y


def _finite(name: str, arr: np.ndarray, arr_name: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {arr_name} contains NaN or infinity")
    return arr


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of exact matches, (1/n) Σ [ŷ_i = y_i]."""
    t, p = _pair("accuracy", y_true, y_pred, "y_true", "y_pred")
    return float(sklearn.metrics.accuracy_score(t, p))


def f1(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    average: Literal["binary", "macro"] = "binary",
    pos_label: int | str | bool = 1,
) -> float:
    """F1 = 2PR/(P+R); ``binary``: of ``pos_label``; ``macro``: mean over the classes in y_true ∪ y_pred.

    A class never predicted and never true contributes nothing; P or R undefined (0/0) counts as 0, as in
    scikit-learn with ``zero_division=0``.
    """
    t, p = _pair("f1", y_true, y_pred, "y_true", "y_pred")
    if average == "binary":
        labels = set(t.tolist()) | set(p.tolist())
        if len(labels) > 2:
            raise ValueError(f"f1: average='binary' needs at most 2 classes, got {sorted(map(str, labels))}")
        if pos_label not in labels:
            raise ValueError(
                f"f1: pos_label={pos_label!r} occurs in neither y_true nor y_pred ({sorted(map(str, labels))})"
            )
        return float(sklearn.metrics.f1_score(t, p, average="binary", pos_label=pos_label, zero_division=0))
    if average == "macro":
        return float(sklearn.metrics.f1_score(t, p, average="macro", zero_division=0))
    raise ValueError(f"f1: average must be 'binary' or 'macro', got {average!r}")


def matthews_corrcoef(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Matthews correlation (TP·TN − FP·FN)/sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0.0 if a marginal is constant."""
    t, p = _pair("matthews_corrcoef", y_true, y_pred, "y_true", "y_pred")
    return float(sklearn.metrics.matthews_corrcoef(t, p))


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson r = cov(x, y)/(σ_x σ_y); raises if fewer than 2 points or either input is constant."""
    a, b = _pair("pearson", x, y, "x", "y")
    a, b = _finite("pearson", a, "x"), _finite("pearson", b, "y")
    if len(a) < 2:
        raise ValueError("pearson: needs at least 2 points")
    for arr, arr_name in ((a, "x"), (b, "y")):
        if np.all(arr == arr[0]):
            raise ValueError(f"pearson: {arr_name} is constant, the correlation is undefined")
    return float(scipy.stats.pearsonr(a, b).statistic)


def auc_roc(y_true: ArrayLike, y_score: ArrayLike, pos_label: int | str | bool = 1) -> float:
    """Area under the ROC curve = P(s_pos > s_neg) + ½ P(s_pos = s_neg), for binary labels.

    ``y_true`` is binary; ``pos_label`` names the positive class (any other value is negative). Raises
    if only one class is present (the AUC is undefined).
    """
    t, s = _pair("auc_roc", y_true, y_score, "y_true", "y_score")
    s = _finite("auc_roc", s, "y_score")
    classes = set(t.tolist())
    if len(classes) > 2:
        raise ValueError(f"auc_roc: y_true must be binary, got classes {sorted(map(str, classes))}")
    positive = t == pos_label
    if positive.all() or not positive.any():
        raise ValueError(
            f"auc_roc: y_true has a single class ({sorted(map(str, classes))} with pos_label={pos_label!r}); "
            "the AUC needs both positives and negatives"
        )
    return float(sklearn.metrics.roc_auc_score(positive.astype(int), s))
