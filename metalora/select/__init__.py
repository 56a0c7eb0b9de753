"""Data-selection baselines: BM25, DSIR, a binary quality classifier, and MIX.

``select_jsonl`` is the one entry point (the ``metalora select`` command calls it): it reads candidate
and target JSONL files, scores or mixes the candidates, and writes a JSONL usable as a task file.

- With ``k``: the k selected candidate rows, best first, each with ``"selection_score"``
  (BM25: top-k; DSIR: Gumbel top-k ∝ importance weight, seeded; classifier: top-k of P(target), or with
  ``sampling="pareto"`` GPT-3's Pareto filter instead of k).
- Without ``k``: every candidate row, in input order, with ``"selection_score"`` and ``"weight"`` — a
  non-negative per-row training weight with mean 1 (BM25 and classifier: score / mean score; DSIR: the
  importance weight exp(log w − max log w) / mean).
- ``method="mix"``: the candidates (training data) and target (validation) rows mixed at ``ratio``
  training rows per validation row (``mix.py``), each with ``"selection_source"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metalora.select.bm25 import bm25_scores
from metalora.select.classifier import classifier_scores, pareto_keep
from metalora.select.dsir import dsir_log_importance, gumbel_top_k
from metalora.select.examples import select_examples
from metalora.select.io import PathLike, read_jsonl, read_texts, write_jsonl
from metalora.select.mix import mix_counts, mix_rows
from metalora.select.scoring import METHODS, check_k, check_options, score_stats, score_texts

__all__ = [
    "METHODS",
    "bm25_scores",
    "classifier_scores",
    "dsir_log_importance",
    "gumbel_top_k",
    "mix_counts",
    "mix_rows",
    "pareto_keep",
    "read_jsonl",
    "select_examples",
    "select_jsonl",
    "write_jsonl",
]


def select_jsonl(
    method: str,
    candidates_path: PathLike,
    target_path: PathLike,
    out_path: PathLike,
    k: int | None = None,
    ratio: float | None = None,
    seed: int = 0,
    text_fields: Sequence[str] = ("prompt", "response"),
    **options: Any,
) -> dict[str, Any]:
    """Select or weight the rows of ``candidates_path`` for the target set in ``target_path``; write
    ``out_path``; return a summary (method, counts, score statistics, paths, seed).

    ``text_fields``: the row fields joined (newline) into the text that is scored. ``options``: per
    method, the names in ``METHODS`` (e.g. ``aggregate="max"`` for BM25, ``temperature=0`` for DSIR,
    ``sampling="pareto", alpha=9`` for the classifier).
    """
    check_options(method, k, ratio, options)
    rows, texts = read_texts(candidates_path, text_fields)
    target_rows, target_texts = read_texts(target_path, text_fields)
    check_k(method, k, len(rows))
    summary: dict[str, Any] = {
        "method": method,
        "candidates": str(candidates_path),
        "target": str(target_path),
        "out": str(out_path),
        "n_candidates": len(rows),
        "n_target": len(target_rows),
        "k": k,
        "ratio": ratio,
        "seed": seed,
        "text_fields": list(text_fields),
        "options": dict(options),
    }
    if method == "mix":
        mixed = mix_rows(rows, target_rows, ratio=ratio, k=k, seed=seed)
        summary["n_from_candidates"] = sum(r["selection_source"] == "candidates" for r in mixed)
        summary["n_from_target"] = sum(r["selection_source"] == "target" for r in mixed)
        summary["n_written"] = write_jsonl(mixed, out_path)
        return summary
    scores, weights, chosen = score_texts(method, texts, target_texts, k, seed, dict(options))
    if chosen is None:
        out = [
            {**row, "selection_score": float(s), "weight": float(w)}
            for row, s, w in zip(rows, scores, weights, strict=True)
        ]
    else:
        out = [{**rows[i], "selection_score": float(scores[i])} for i in chosen]
    summary["n_written"] = write_jsonl(out, out_path)
    return summary | score_stats(scores)
