"""The causal-LM loss the algorithms share, as a (sum, count) pair so callers choose the normalization.

    L(batch) = Σ_{b,t: labels[b,t+1] ≠ -100} −log p(labels[b,t+1] | tokens ≤ t) / N

with N the number of label tokens the caller normalizes by (the batch's own for a mean-token loss, the
global count over micro-batches and ranks for exact gradient accumulation and data parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalora.data.tokenize import IGNORE_INDEX


def token_loss_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of next-token cross-entropy over the label tokens, and per-row label-token counts.

    logits: [B, L, V]; labels: [B, L] with -100 on prompt and padding. Computed in at least fp32.
    """
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy a [B, L, V] tensor (HF's trick).
    targets = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # target of position t
    dtype = torch.promote_types(logits.dtype, torch.float32)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(dtype),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)  # [B, L], 0 where ignored
    return per_token.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the label tokens and their count (see ``token_loss_rows``)."""
    rows, counts = token_loss_rows(logits, labels)
    return rows.sum(), int(counts.sum())


def label_token_count(labels: torch.Tensor) -> int:
    """Label tokens the loss of ``token_loss_sum`` covers (the shifted labels that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
