"""A binary quality classifier (the GPT-3 / PaLM filter): target-like versus raw text.

Features: hashed unigram+bigram counts (``hashing.py``, 2^18 buckets by default as Spark's ``HashingTF``
that GPT-3 used), rows L2-normalised. A logistic regression (scikit-learn, ``class_weight="balanced"`` so
a small target set is not swamped by a large raw set) is trained with the target texts as positives and
the raw texts (by default the candidates themselves) as negatives; a candidate's score is
P(positive | x) = σ(wᵀx + b).

Selection either keeps the top-k scores, or samples as GPT-3 (Brown et al., 2020, appendix A) did:

    keep x  ⇔  np.random.pareto(α) > 1 − score(x),   α = 9

(numpy's ``pareto`` is the Lomax distribution, so P(keep) = (2 − score)^−α: every document has a chance,
high scores nearly always stay).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize

from metalora.select.hashing import hashed_ngram_counts

__all__ = ["classifier_scores", "pareto_keep"]


def classifier_scores(
    candidates: Sequence[str],
    target: Sequence[str],
    raw: Sequence[str] | None = None,
    num_buckets: int = 2**18,
    n: int = 2,
    C: float = 1.0,
    seed: int = 0,
    max_iter: int = 1000,
) -> np.ndarray:
    """P(target | candidate) from a logistic regression trained target (1) vs raw (0)."""
    if not target:
        raise ValueError("the classifier needs at least one target text (positives)")
    raw = candidates if raw is None else raw
    if not raw:
        raise ValueError("the classifier needs at least one raw text (negatives)")
    x_train = normalize(
        scipy.sparse.vstack(
            [hashed_ngram_counts(target, num_buckets, n), hashed_ngram_counts(raw, num_buckets, n)]
        )
    )
    y_train = np.concatenate([np.ones(len(target)), np.zeros(len(raw))])
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed)
    model.fit(x_train, y_train)
    x = normalize(hashed_ngram_counts(candidates, num_buckets, n))
    return model.predict_proba(x)[:, list(model.classes_).index(1.0)]


def pareto_keep(scores: np.ndarray, alpha: float = 9.0, seed: int = 0) -> np.ndarray:
    """Boolean mask: ``default_rng(seed).pareto(alpha, n) > 1 − scores`` (GPT-3's filter with α = 9)."""
    scores = np.asarray(scores, dtype=np.float64)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return np.random.default_rng(seed).pareto(alpha, size=len(scores)) > 1.0 - scores
