"""DSIR: data selection with importance resampling (Xie et al., 2023, "Data Selection for Language Models
via Importance Resampling").

Feature model: hashed unigram+bigram counts in ``num_buckets`` = 10,000 buckets (``hashing.py``). Two
bag-of-ngrams models, one fitted on the target texts and one on the raw texts (by default the candidates
themselves). By default they are the authors' ``data-selection`` package's (1.0.3, ``HashedNgramDSIR``):
SHA-256 buckets of the lower-cased ``WordPunctTokenizer`` n-grams and

    log p(b) = log(Σ_docs c_b / Σ_b' Σ_docs c_b' + 1e-8)

so ours selects what the package selects (``benchmarks/dsir_package.py``: the same log-weights). Our option
``smoothing=λ`` uses add-λ (Laplace) estimates instead, ``p(b) = (Σ_docs c_b + λ) / (Σ_b' Σ_docs c_b' + λ·B)``
(with ``hash_name="blake2b"``, the buckets of the earlier versions). With a small target (hundreds of
examples) most buckets are empty and the log-weights depend on which n-grams share a bucket: the two hashes
give log-weights with a Spearman ρ of only about 0.5 on MedMCQA → MedQA, which is why the default follows the
package to the bucket.

The log importance weight of a candidate x with bucket counts c(x) is

    log w(x) = Σ_b c_b(x) · (log p_target(b) − log p_raw(b))

and k candidates are resampled without replacement ∝ w by the Gumbel top-k trick:

    keys_i = log w_i + τ·G_i,  G_i ~ Gumbel(0, 1) i.i.d. (seeded numpy Generator);  take the k largest keys.

τ = 1 samples exactly ∝ w; τ → 0 approaches the deterministic top-k (τ = 0 is the top-k itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse

from metalora.select.hashing import hashed_ngram_counts

__all__ = ["bag_of_ngrams_log_probs", "dsir_log_importance", "gumbel_top_k"]


PACKAGE_EPSILON = 1e-8
"""``data-selection``'s floor inside the log: log(p + 1e-8)."""


def bag_of_ngrams_log_probs(
    counts: scipy.sparse.spmatrix | np.ndarray, smoothing: float | None = None
) -> np.ndarray:
    """log p(b) for the bucket-count matrix ``counts``: the package's log(Σ_docs c_b / Σ_b' Σ_docs c_b' +
    1e-8) (``smoothing=None``), or add-λ: log(Σ_docs c_b + λ) − log(Σ_b' (Σ_docs c_b' + λ))."""
    totals = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    if smoothing is None:
        return np.log(totals / totals.sum() + PACKAGE_EPSILON)
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0 (otherwise empty buckets give log 0), got {smoothing}")
    totals = totals + smoothing
    return np.log(totals) - np.log(totals.sum())


def dsir_log_importance(
    candidates: Sequence[str],
    target: Sequence[str],
    raw: Sequence[str] | None = None,
    num_buckets: int = 10_000,
    n: int = 2,
    smoothing: float | None = None,
    hash_name: str = "sha256",
) -> np.ndarray:
    """log w(x) = Σ_b c_b(x)(log p_target(b) − log p_raw(b)) for every candidate; ``raw`` defaults to the
    candidates. The defaults are the ``data-selection`` package's estimator and buckets."""
    if not target:
        raise ValueError("DSIR needs at least one target text")
    cand_counts = hashed_ngram_counts(candidates, num_buckets, n, hash_name)
    raw_counts = cand_counts if raw is None else hashed_ngram_counts(raw, num_buckets, n, hash_name)
    log_ratio = bag_of_ngrams_log_probs(hashed_ngram_counts(target, num_buckets, n, hash_name), smoothing)
    log_ratio = log_ratio - bag_of_ngrams_log_probs(raw_counts, smoothing)
    return np.asarray(cand_counts @ log_ratio, dtype=np.float64).ravel()


def gumbel_top_k(log_weights: np.ndarray, k: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """Indices of k samples without replacement ∝ exp(log_weights) (temperature 1), best key first.

    keys = log_w + τ·Gumbel(0,1) from ``numpy.random.default_rng(seed)``; τ = 0 gives the top-k of log_w
    (ties broken by index).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim != 1:
        raise ValueError(f"log_weights must be 1-D, got shape {log_weights.shape}")
    if not 1 <= k <= len(log_weights):
        raise ValueError(f"k must be in [1, {len(log_weights)}], got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    keys = log_weights
    if temperature > 0:
        keys = log_weights + temperature * np.random.default_rng(seed).gumbel(size=len(log_weights))
    return np.argsort(-keys, kind="stable")[:k]
