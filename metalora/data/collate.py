"""Right-padded batches from tokenized features (the contract's `collate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metalora.data.errors import MetaloraDataError
from metalora.data.tokenize import IGNORE_INDEX


def collate(
    features: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Stack features ``{input_ids, labels, task_id, sample_id}`` into a right-padded batch.

    Returns ``{input_ids LongTensor[B, L], attention_mask LongTensor[B, L], labels LongTensor[B, L]
    (-100 on padding), task_ids LongTensor[B], sample_ids list[str]}``.
    """
    if not features:
        raise MetaloraDataError("collate got no features")
    if pad_token_id is None:
        raise MetaloraDataError("collate needs a pad_token_id (load_base sets the tokenizer's pad token)")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(features)
    input_ids = torch.full((batch, length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise MetaloraDataError(f"feature {f.get('sample_id')!r}: input_ids and labels differ in length")
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_ids": torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long),
        "sample_ids": [str(f["sample_id"]) for f in features],
    }


def collate_packed(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate features into one row with no padding (padding-free packing).

    Returns ``{input_ids LongTensor[1, T], position_ids LongTensor[1, T] (0, 1, … restarting at each
    sample), labels LongTensor[1, T], segment_ids LongTensor[T] (the sample of each token), task_ids
    LongTensor[S], sample_ids list[str]}`` with T the features' total length. There is no
    ``attention_mask``: given ``position_ids`` and no mask, transformers' mask builder
    (``masking_utils.find_packed_sequence_indices``) makes attention block-causal per sample, so every sample
    attends only to itself at its own positions, as it would alone. Each sample's first label is -100, so
    no position predicts the next sample's first token.
    """
    if not features:
        raise MetaloraDataError("collate_packed got no features")
    input_ids, labels, positions, segments = [], [], [], []
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n or n == 0:
            raise MetaloraDataError(
                f"feature {f.get('sample_id')!r}: input_ids and labels must be non-empty and of one length"
            )
        input_ids += list(f["input_ids"])
        labels += [IGNORE_INDEX, *list(f["labels"])[1:]]  # position 0 is never a target of its own sample
        positions += range(n)
        segments += [i] * n
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "segment_ids": torch.tensor(segments, dtype=torch.long),
        "task_ids": torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long),
        "sample_ids": [str(f["sample_id"]) for f in features],
    }
