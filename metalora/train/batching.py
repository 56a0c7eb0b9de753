"""Turning lists of tokenized features into the engine's batches (the data layer's ``collate``), plus counts.

A feature is the data contract's ``{input_ids, labels (-100 masked), task_id, sample_id}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metalora.data import collate

Feature = dict[str, Any]


def micro_batches(features: Sequence[Feature], pad_token_id: int, size: int | None) -> list[dict[str, Any]]:
    """``features`` collated into consecutive micro-batches of at most ``size`` (one batch when None)."""
    if not features:
        return []
    size = size or len(features)
    return [collate(features[i : i + size], pad_token_id) for i in range(0, len(features), size)]


def count_tokens(features: Sequence[Feature]) -> int:
    """Non-padding input tokens."""
    return sum(len(f["input_ids"]) for f in features)
