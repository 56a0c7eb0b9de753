"""The causal-LM loss, owned here: per-sample (sum, count) rows, the per-sample mean, the label-token count.

    L(batch) = Σ_{b,t: labels[b,t+1] ≠ -100} −log p(labels[b,t+1] | tokens ≤ t) / N

with N the number of label tokens the caller normalizes by (the batch's own for a mean-token loss, the
global count over micro-batches and ranks for exact gradient accumulation and data parallelism).
Position t carries a loss term iff the *next* label is not -100 (``loss_positions``): the last prompt
position predicts the first response token, the last position predicts nothing. Every count of label
tokens in the package is ``loss_positions(...).sum()``; labels come from ``metalora.data.tokenize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalora.data.tokenize import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "count_label_tokens",
    "forward_losses",
    "label_token_count",
    "loss_positions",
    "per_sample_loss",
    "token_loss_rows",
    "token_loss_segments",
]


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: position p carries a loss term iff labels[:, p+1] ≠ -100 (last position: never)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def label_token_count(labels: torch.Tensor) -> int:
    """Label tokens the loss covers (the shifted labels that are not -100) in a [B, L] batch."""
    return int(loss_positions(labels).sum())


def count_label_tokens(features: Sequence[dict[str, Any]]) -> int:
    """Label tokens the loss covers in tokenized features (``labels`` lists of any lengths)."""
    return sum(label_token_count(torch.as_tensor([f["labels"]])) for f in features)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L] next-token cross-entropy of position t against labels[:, t+1] (0 where that is -100), in at
    least float32."""
    labels = labels.to(logits.device)
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy a [B, L, V] tensor.
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # target of position t
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(dtype),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)


def token_loss_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums of next-token cross-entropy over the unmasked labels, and their counts.

    Args:
        logits: ``[B, L, V]`` model outputs (unshifted, as HF returns them).
        labels: ``[B, L]`` with ``-100`` on prompt and padding (unshifted; shifted here as HF does).

    Returns:
        ``(sums [B], counts [B] long)``, computed in at least float32 (float64 logits stay float64).
    """
    return _token_losses(logits, labels).sum(dim=1), loss_positions(labels).sum(dim=1)


def token_loss_segments(
    logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor, segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_loss_rows`` of a packed row (``data.collate_packed``): the sums and counts per sample.

    ``logits`` ``[1, T, V]``, ``labels`` ``[1, T]`` (each sample's first label -100, so no position targets
    the next sample), ``segment_ids`` ``[T]``: the sample of each token, 0 … ``segments`` − 1."""
    losses = _token_losses(logits, labels)[0]
    index = segment_ids.to(losses.device)
    sums = torch.zeros(segments, dtype=losses.dtype, device=losses.device).index_add(0, index, losses)
    counts = torch.zeros(segments, dtype=torch.long, device=losses.device)
    return sums, counts.index_add(0, index, loss_positions(labels)[0].to(losses.device).long())


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_i: mean next-token cross-entropy per sample over its unmasked response tokens (``token_loss_rows``).

    Returns:
        ``(loss [B], valid [B] bool)``: a sample with no unmasked label has loss exactly 0 (no NaN, no
        gradient) and ``valid=False``. Computed in at least float32 (float64 logits stay float64).
    """
    sums, counts = token_loss_rows(logits, labels)
    return sums / counts.clamp(min=1), counts > 0


def forward_losses(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_sample_loss`` of one collated batch (call inside the batch's routing/autocast context)."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    return per_sample_loss(logits, batch["labels"])
