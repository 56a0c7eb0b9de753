"""Metrics against scikit-learn / scipy references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from metalora.eval.metrics import accuracy, auc_roc, f1, matthews_corrcoef, pearson

RNG = np.random.default_rng(0)
Y_TRUE = RNG.integers(0, 2, size=200)
Y_PRED = np.where(RNG.random(200) < 0.7, Y_TRUE, 1 - Y_TRUE)
Y3_TRUE = RNG.integers(0, 3, size=200)
Y3_PRED = np.where(RNG.random(200) < 0.6, Y3_TRUE, RNG.integers(0, 3, size=200))
SCORES = Y_TRUE * 0.5 + RNG.random(200)


# ------------------------------------------------------------------------------- hand-computed values
# y_true = [1, 1, 0, 0, 1], y_pred = [1, 0, 0, 1, 1]: TP=2, FN=1, TN=1, FP=1.
T5, P5 = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]


def test_accuracy_hand() -> None:
    assert accuracy(T5, P5) == pytest.approx(3 / 5)
    assert accuracy(["a", "b"], ["a", "c"]) == 0.5


def test_f1_hand() -> None:
    # P = 2/3, R = 2/3 -> F1 = 2/3; negative class: P = 1/2, R = 1/2 -> 1/2; macro = (2/3 + 1/2)/2.
    assert f1(T5, P5) == pytest.approx(2 / 3)
    assert f1(T5, P5, pos_label=0) == pytest.approx(1 / 2)
    assert f1(T5, P5, average="macro") == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_mcc_hand() -> None:
    expected = (2 * 1 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))  # = 1/6
    assert matthews_corrcoef(T5, P5) == pytest.approx(expected)
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_pearson_hand() -> None:
    # x = [1, 2, 3], y = [1, 3, 2]: dx = [-1, 0, 1], dy = [-1, 1, 0] -> r = 1 / (sqrt 2 · sqrt 2) = 1/2.
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


def test_auc_hand() -> None:
    # positives {0.9, 0.4}, negatives {0.5, 0.1}: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4.
    assert auc_roc([1, 0, 1, 0], [0.9, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    # a tie counts one half: positive 0.5 vs negative 0.5 -> 1/2.
    assert auc_roc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    # string labels with an explicit positive class
    assert auc_roc(["spam", "ham", "spam", "ham"], [0.9, 0.5, 0.4, 0.1], pos_label="spam") == pytest.approx(
        0.75
    )


# ------------------------------------------------------------------------------ reference libraries


def test_against_sklearn_and_scipy() -> None:
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(sklearn.metrics.accuracy_score(Y_TRUE, Y_PRED))
    assert f1(Y_TRUE, Y_PRED) == pytest.approx(sklearn.metrics.f1_score(Y_TRUE, Y_PRED))
    assert f1(Y3_TRUE, Y3_PRED, average="macro") == pytest.approx(
        sklearn.metrics.f1_score(Y3_TRUE, Y3_PRED, average="macro")
    )
    assert matthews_corrcoef(Y_TRUE, Y_PRED) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(Y_TRUE, Y_PRED)
    )
    assert matthews_corrcoef(Y3_TRUE, Y3_PRED) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(Y3_TRUE, Y3_PRED)
    )
    x, y = RNG.normal(size=50), RNG.normal(size=50)
    assert pearson(x, x + y) == pytest.approx(scipy.stats.pearsonr(x, x + y)[0])
    assert auc_roc(Y_TRUE, SCORES) == pytest.approx(sklearn.metrics.roc_auc_score(Y_TRUE, SCORES))
    assert 0.5 < auc_roc(Y_TRUE, SCORES) < 1.0  # the scores carry signal, so this case is not trivial


def test_auc_equals_pairwise_definition() -> None:
    """AUC = P(s+ > s-) + ½ P(s+ = s-), by brute force over all pairs."""
    scores = np.round(SCORES, 1)  # force ties
    pos, neg = scores[Y_TRUE == 1], scores[Y_TRUE == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auc_roc(Y_TRUE, scores) == pytest.approx(wins / (len(pos) * len(neg)))


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [accuracy, f1, matthews_corrcoef, pearson, auc_roc])
def test_length_mismatch_and_empty(fn) -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        fn([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_specific_errors() -> None:
    with pytest.raises(ValueError, match="single class"):
        auc_roc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        auc_roc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auc_roc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="constant"):
        pearson([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1], [2])
    with pytest.raises(ValueError, match="at most 2 classes"):
        f1([0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="pos_label"):
        f1([0, 0], [0, 0], pos_label=1)
    with pytest.raises(ValueError, match="average"):
        f1([0, 1], [0, 1], average="micro")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        accuracy([[1, 0]], [[1, 0]])


def test_regression_metrics_of_generations_match_scipy():
    """Pearson over the numeric predictions (unparsed ones left out and counted), against scipy."""
    from scipy.stats import pearsonr

    from metalora.eval.generation import GenPrediction
    from metalora.eval.tasks import regression_metrics

    rows = [("3.8", "4"), ("1", "0.5"), (None, "2"), ("2.5", "2.4"), ("five", "5"), ("4.6", "4.4")]
    preds = [GenPrediction(f"i{j}", "sts", "", p, g, p == g) for j, (p, g) in enumerate(rows)]
    got = regression_metrics(preds)
    kept = [(3.8, 4.0), (1.0, 0.5), (2.5, 2.4), (4.6, 4.4)]
    assert got["parsed"] == pytest.approx(4 / 6)
    assert got["pearson"] == pytest.approx(pearsonr(*zip(*kept, strict=True)).statistic, abs=1e-12)
    assert regression_metrics([GenPrediction("a", "t", "", "x", "a cat", False)]) == {}  # not numeric gold
