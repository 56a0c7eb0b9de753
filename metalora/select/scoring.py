"""The scoring step shared by ``select_jsonl`` (files) and ``select_examples`` (a run's pool in memory):
each method's scores of candidate texts against target texts, mean-one training weights, and the chosen rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from metalora.select.bm25 import bm25_scores
from metalora.select.classifier import classifier_scores, pareto_keep
from metalora.select.dsir import dsir_log_importance, gumbel_top_k

__all__ = ["METHODS", "check_k", "check_options", "score_stats", "score_texts"]

# method -> the keyword options it accepts (beyond k, ratio, seed, text_fields)
METHODS: dict[str, tuple[str, ...]] = {
    "bm25": ("aggregate", "k1", "b", "stopwords"),
    "dsir": ("num_buckets", "n", "smoothing", "hash_name", "temperature"),
    "classifier": ("num_buckets", "n", "C", "max_iter", "sampling", "alpha"),
    "mix": (),
}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]


def _mean_one(weights: np.ndarray) -> np.ndarray:
    mean = weights.mean()
    return np.ones_like(weights) if mean <= 0 else weights / mean


def check_options(method: str, k: int | None, ratio: float | None, options: dict[str, Any]) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {sorted(METHODS)}")
    unknown = sorted(set(options) - set(METHODS[method]))
    if unknown:
        raise ValueError(
            f"method {method!r} takes no option(s) {unknown}; it accepts {list(METHODS[method])}"
        )
    if ratio is not None and method != "mix":
        raise ValueError(f"ratio applies to method 'mix' only, not {method!r}; use k to choose a size")
    if options.get("sampling") not in (None, "top_k", "pareto"):
        raise ValueError(f"classifier sampling must be 'top_k' or 'pareto', got {options['sampling']!r}")
    if options.get("sampling") == "pareto" and k is not None:
        raise ValueError("classifier sampling='pareto' keeps a random number of rows; do not pass k")


def check_k(method: str, k: int | None, n_candidates: int, required: bool = False) -> None:
    """A size ``k`` in [1, n_candidates] for the scoring methods (``required``: it must be given); MIX sizes
    itself (``mix.mix_counts``)."""
    if method == "mix" or (k is None and not required):
        return
    if k is None or not 1 <= k <= n_candidates:
        raise ValueError(f"{method}: k must be in [1, {n_candidates}] (the number of candidates), got {k}")


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """The summary's score statistics: min, mean, max."""
    return {
        "score_min": float(scores.min()),
        "score_mean": float(scores.mean()),
        "score_max": float(scores.max()),
    }


def score_texts(
    method: str, texts: list[str], target_texts: list[str], k: int | None, seed: int, options: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(scores, mean-one weights, the chosen rows in order or None to keep all) of one scoring method."""
    sampling = options.pop("sampling", None)
    alpha = options.pop("alpha", 9.0)
    temperature = options.pop("temperature", 1.0)
    if method == "bm25":
        scores = bm25_scores(texts, target_texts, **options)
        return scores, _mean_one(scores), _top_k(scores, k) if k is not None else None
    if method == "dsir":
        scores = dsir_log_importance(texts, target_texts, **options)
        chosen = gumbel_top_k(scores, k, seed=seed, temperature=temperature) if k is not None else None
        return scores, _mean_one(np.exp(scores - scores.max())), chosen
    scores = classifier_scores(texts, target_texts, seed=seed, **options)
    if sampling == "pareto":
        keep = pareto_keep(scores, alpha=alpha, seed=seed)
        return scores, _mean_one(scores), np.flatnonzero(keep)[np.argsort(-scores[keep], kind="stable")]
    return scores, _mean_one(scores), _top_k(scores, k) if k is not None else None
