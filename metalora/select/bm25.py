"""BM25 relevance of candidate texts to a target set (``bm25s``, Lucene variant).

The candidates are the indexed corpus; every target text is a query. For a query q and document d,

    BM25(d, q) = Σ_{t ∈ q} IDF(t) · tf(t, d) / (tf(t, d) + k1·(1 − b + b·|d|/avgdl)),
    IDF(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

(bm25s ``method="lucene"``; tokens: lower-cased ``\\w\\w+`` words minus English stop words). A candidate's
score against the target set aggregates over queries:

- ``"sum"`` (default): Σ_q BM25(d, q), the usual way to rank a pool against a set of queries — a candidate
  scores high when it matches many targets well;
- ``"mean"``: the same divided by the number of queries (same ranking as ``sum``);
- ``"max"``: max_q BM25(d, q), nearest-neighbour style: one very similar target suffices;
- ``"concat"``: BM25(d, q_1 ⊕ … ⊕ q_m), one query of all target tokens (a term repeated across targets
  counts once per occurrence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import bm25s
import numpy as np

__all__ = ["bm25_scores", "bm25_tokenize"]

Aggregate = Literal["sum", "mean", "max", "concat"]


def bm25_tokenize(texts: Sequence[str], stopwords: str | list[str] | None = "en") -> list[list[str]]:
    """bm25s' tokenizer: lower-case, ``\\b\\w\\w+\\b`` tokens, stop words removed; no stemming."""
    return bm25s.tokenize(list(texts), return_ids=False, stopwords=stopwords or [], show_progress=False)


def bm25_scores(
    candidates: Sequence[str],
    targets: Sequence[str],
    aggregate: Aggregate = "sum",
    k1: float = 1.5,
    b: float = 0.75,
    stopwords: str | list[str] | None = "en",
) -> np.ndarray:
    """One score per candidate: its BM25 relevance to the target queries, aggregated as ``aggregate``."""
    if not candidates:
        raise ValueError("BM25 needs at least one candidate text")
    if not targets:
        raise ValueError("BM25 needs at least one target text")
    if aggregate not in ("sum", "mean", "max", "concat"):
        raise ValueError(f"aggregate must be one of sum, mean, max, concat; got {aggregate!r}")
    corpus = bm25_tokenize(candidates, stopwords)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus, show_progress=False)
    vocab = {t for doc in corpus for t in doc}

    def score(query: list[str]) -> np.ndarray:
        known = [t for t in query if t in vocab]  # terms absent from the corpus contribute 0
        if not known:
            return np.zeros(len(candidates))
        return np.asarray(retriever.get_scores(known), dtype=np.float64)

    queries = bm25_tokenize(targets, stopwords)
    if aggregate == "concat":
        return score([t for q in queries for t in q])
    acc = score(queries[0])  # running sum or max over queries: O(n_candidates) memory
    for q in queries[1:]:
        acc = np.maximum(acc, score(q)) if aggregate == "max" else acc + score(q)
    return acc / len(queries) if aggregate == "mean" else acc
