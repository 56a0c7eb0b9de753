"""Turning lists of tokenized features into the engine's batches (the data layer's ``collate``), plus counts.

A feature is the data contract's ``{input_ids, labels (-100 masked), task_id, sample_id}``.

Length grouping (``length_grouped_order``) is HF ``Trainer``'s ``group_by_length`` idea
(``LengthGroupedSampler``): cut a random permutation into mega-batches of ``MEGABATCH_FACTOR`` batches, sort
each by length so a batch holds samples of similar length and is padded less; here the batches of each
mega-batch are then shuffled (seeded), so no length curriculum runs through an epoch. Written by hand
because transformers' sampler is a torch ``Sampler`` over a dataset, not a function of our seeded
permutation, and we need the order itself for exact resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metalora.data import collate, collate_packed

Feature = dict[str, Any]

MEGABATCH_FACTOR = 50
"""Batches per mega-batch of ``length_grouped_order`` (HF ``LengthGroupedSampler``'s default)."""


def micro_batches(
    features: Sequence[Feature], pad_token_id: int, size: int | None, packed: bool = False
) -> list[dict[str, Any]]:
    """``features`` collated into consecutive micro-batches of at most ``size`` (one batch when None);
    ``packed``: each micro-batch is one row with no padding (``data.collate_packed``)."""
    if not features:
        return []
    size = size or len(features)
    slices = [features[i : i + size] for i in range(0, len(features), size)]
    return [collate_packed(part) if packed else collate(part, pad_token_id) for part in slices]


def count_tokens(features: Sequence[Feature]) -> int:
    """Non-padding input tokens."""
    return sum(len(f["input_ids"]) for f in features)


def length_grouped_order(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[int]:
    """``order`` (a permutation) regrouped so consecutive ``batch_size`` slices hold similar lengths.

    Each slice of ``MEGABATCH_FACTOR * batch_size`` indices of ``order`` is sorted by length (longest first,
    ties kept in ``order``), cut into batches, and the batches of that slice shuffled with ``rng``. Every
    index stays in its own mega-batch, so the set an epoch covers and its coarse randomness are unchanged.
    """
    mega = MEGABATCH_FACTOR * batch_size
    out: list[int] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])  # stable: ties keep order
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in rng.permutation(len(batches)).tolist():
            out += batches[b]
    return out


def longest_first(features: Sequence[Feature]) -> list[Feature]:
    """``features`` sorted by length, longest first (ties keep their order): cut into micro-batches, each
    pads only to its own longest sample."""
    return sorted(features, key=lambda f: -len(f["input_ids"]))


def padded_tokens(batches: Sequence[Sequence[Feature]]) -> int:
    """Input tokens the batches occupy after right-padding each to its longest sample."""
    return sum(len(b) * max(len(f["input_ids"]) for f in b) for b in batches if b)
