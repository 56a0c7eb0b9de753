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
