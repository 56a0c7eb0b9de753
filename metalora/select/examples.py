"""Selection over a run's training pool in memory: what a recipe's ``select:`` section does.

The same methods as ``select_jsonl`` (``scoring.score_texts``, ``mix.mix_rows``) applied to ``Example``s
instead of JSONL rows: an example's text is its prompt and response joined by a newline (``select_jsonl``'s
default ``text_fields``), so a pool written out as JSONL and passed to ``metalora select`` chooses the same
rows. BM25, DSIR and the classifier keep ``k`` candidates (best first); MIX returns the shuffled mix of
candidates and target examples at ``ratio`` candidates per target example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metalora.data.example import Example
from metalora.select.mix import mix_rows
from metalora.select.scoring import check_k, check_options, score_stats, score_texts

__all__ = ["example_text", "select_examples"]


def example_text(example: Example) -> str:
    """What is scored: ``prompt`` and ``response`` joined by a newline."""
    return f"{example.prompt}\n{example.response}"


def select_examples(
    method: str,
    candidates: Sequence[Example],
    target: Sequence[Example],
    k: int | None = None,
    ratio: float | None = None,
    seed: int = 0,
    **options: Any,
) -> tuple[list[Example], dict[str, Any]]:
    """(the chosen examples in order, a summary: method, counts, score statistics, chosen ids).

    BM25 / DSIR / classifier need ``k`` (1 ≤ k ≤ len(candidates)); MIX takes ``ratio`` and optionally
    ``k`` (``mix.mix_counts``)."""
    check_options(method, k, ratio, options)
    check_k(method, k, len(candidates), required=True)
    summary: dict[str, Any] = {
        "method": method,
        "n_candidates": len(candidates),
        "n_target": len(target),
        "k": k,
        "ratio": ratio,
        "seed": seed,
        "options": dict(options),
    }
    if method == "mix":
        rows = mix_rows(
            [{"i": i} for i in range(len(candidates))], [{"i": i} for i in range(len(target))], ratio, k, seed
        )
        chosen = [(candidates if r["selection_source"] == "candidates" else target)[r["i"]] for r in rows]
        summary["n_from_candidates"] = sum(r["selection_source"] == "candidates" for r in rows)
        summary["n_from_target"] = len(rows) - summary["n_from_candidates"]
    else:
        texts = [example_text(e) for e in candidates]
        target_texts = [example_text(e) for e in target]
        scores, _, order = score_texts(method, texts, target_texts, k, seed, dict(options))
        assert order is not None  # k is set
        chosen = [candidates[i] for i in order]
        summary |= score_stats(scores)
    summary["n_chosen"] = len(chosen)
    summary["chosen_ids"] = [e.id for e in chosen]
    return chosen, summary
