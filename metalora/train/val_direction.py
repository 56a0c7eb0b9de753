"""The validation direction a training sample is scored against: coefficients β over the validation batch.

Every score of the reweighting step is an inner product with a combination of validation gradients,

    G_β = Σ_v β_v ∇ℓ_v,      u_i = ⟨∇ℓ_i, G_β⟩ = Σ_v β_v ⟨∇ℓ_i, ∇ℓ_v⟩ ≈ Σ_v β_v Σ_l (ā_i·ā_v)(ĝ_i·ĝ_v),

and the paper's validation loss L_V = mean_v ℓ_v is β_v = 1/|V|. Two options change β; both are ours, not
the paper's or its code's, and both are off by default (``reweight.direction.balance`` and
``reweight.direction.shared``). Why they exist (measured in ``docs/benchmarks.md``, probe of part (c)): with an
answer the size of one token, ∇ℓ_i ≈ c_i J_i, where c_i is the sample's residual on its answer and
J_i = J_0 + e_i is the gradient of the answer margin. J_0, the part every input shares, dominates, so
u_i ≈ c_i ⟨J_0, G⟩ + … : the score mostly says which *answer* the validation batch currently pulls
towards, and a sample with a wrong answer is trusted whenever its answer is the pulled one.

* ``balance="answer"``: the validation samples are grouped by their answer (the response tokens);
  each group a pulls with unit strength, whatever its size and residual:

      m_a = (1/|a|) Σ_{v∈a} ∇ℓ_v,   G = (1/#groups) Σ_a m_a / ‖m_a‖
      ⇒ β_v = 1 / (#groups · |a(v)| · ‖m_{a(v)}‖),   ‖m_a‖² = (1/|a|²) Σ_{v,v'∈a} K_{vv'}

  With a generation task every answer is its own group: each validation gradient enters at unit norm.
* ``shared="remove"``: the top principal direction of the validation batch's per-sample
  gradients (J_0's, when the answers differ in sign) is projected out of G. With X the [|V|, P] matrix of
  validation gradients and K = X Xᵀ, the top eigenpair (λ, e) of K gives the unit direction
  û = Xᵀe/√λ, and

      G − (G·û) û = Xᵀ(β − (β·e) e)      ⇒  β ← β − (β·e) e.

Everything is computed from the Gram matrix K_{vv'} = ⟨∇ℓ_v, ∇ℓ_v'⟩, which the low-rank statistics give
as Σ_l (ā_v·ā_v')(ĝ_v·ĝ_v') (``similarity.similarity_matrix``) and the exact mode from per-sample
gradients, so no P-dimensional vector is ever formed. Written by hand: no library computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metalora.train.loss import IGNORE_INDEX

VAL_BALANCES = ("none", "answer")
SHARED_DIRECTIONS = ("keep", "remove")


def answer_groups(features: Sequence[dict[str, Any]]) -> list[int]:
    """A group index per feature: features with the same response tokens (labels ≠ -100) share one."""
    keys: dict[tuple[int, ...], int] = {}
    out = []
    for f in features:
        labels = torch.as_tensor(f["labels"])
        key = tuple(int(t) for t in labels[labels != IGNORE_INDEX].tolist())
        out.append(keys.setdefault(key, len(keys)))
    return out


def is_default(balance: str, shared: str) -> bool:
    """True when β is the paper's 1/|V| (no option changes it)."""
    return balance == "none" and shared == "keep"


def validation_coefficients(
    gram: torch.Tensor,
    groups: Sequence[int] | None = None,
    balance: str = "none",
    shared: str = "keep",
) -> torch.Tensor:
    """β [|V|] (float64) from the validation Gram matrix ``gram`` [|V|, |V|] (formulas in the module doc).

    ``groups``: the answer group of each validation sample (``answer_groups``), needed for
    ``balance="answer"``. A group whose mean gradient is zero (B = 0 at the first step) gets β = 0; so
    does everything when K = 0.
    """
    if balance not in VAL_BALANCES:
        raise ValueError(f"val_balance={balance!r}: expected one of {VAL_BALANCES}")
    if shared not in SHARED_DIRECTIONS:
        raise ValueError(f"shared_direction={shared!r}: expected one of {SHARED_DIRECTIONS}")
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    if gram.shape != (n, n) or n == 0:
        raise ValueError(f"the validation Gram matrix must be square and non-empty, got {tuple(gram.shape)}")
    beta = torch.full((n,), 1.0 / n, dtype=torch.float64, device=gram.device)
    if balance == "answer":
        if groups is None or len(groups) != n:
            raise ValueError(f"val_balance='answer' needs one answer group per validation sample ({n})")
        index = torch.as_tensor(list(groups), device=gram.device)
        labels = index.unique()
        beta = torch.zeros_like(beta)
        for a in labels:
            members = index == a
            size = int(members.sum())
            norm_sq = float(gram[members][:, members].sum()) / size**2
            if norm_sq > 0:
                beta[members] = 1.0 / (len(labels) * size * norm_sq**0.5)
    if shared == "remove":
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        if float(eigenvalues[-1]) > 0:
            top = eigenvectors[:, -1]
            beta = beta - (beta @ top) * top
    return beta
