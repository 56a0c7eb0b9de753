"""The causal-LM loss the algorithms share, as per-sample (sum, count) pairs so callers choose the normalization.

    L(batch) = Σ_{b,t: labels[b,t+1] ≠ -100} −log p(labels[b,t+1] | tokens ≤ t) / N

with N the number of label tokens the caller normalizes by (the batch's own for a mean-token loss, the
global count over micro-batches and ranks for exact gradient accumulation and data parallelism). The
per-sample sums are ``metalora.data.tokenize.token_loss_rows``, the same function that gives reweighting
its per-sample losses.
"""

from __future__ import annotations

import torch

from metalora.data.tokenize import IGNORE_INDEX, token_loss_rows

__all__ = ["IGNORE_INDEX", "label_token_count", "token_loss_rows"]


def label_token_count(labels: torch.Tensor) -> int:
    """Label tokens the loss covers (the shifted labels that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
