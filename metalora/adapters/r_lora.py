"""R-LoRA (Liu, Chang & Wu 2025, "R-LoRA: Random Initialization of Multi-Head LoRA for Multi-Task Learning",
arXiv 2502.15455; code: github.com/jinda-liu/R-LoRA): HydraLoRA with *multi-head randomization*.

HydraLoRA (``hydra_lora.py``) shares one down-projection A and routes every token over N heads B^j. Its
heads start at zero, so at the start they all receive gradients in the same direction (each head's
gradient is ω_j(x) g zᵀ) and stay alike. R-LoRA breaks that symmetry in two ways:

1. **Multi-head random initialization**: the heads B^j start at different random points.
2. **Multi-head dropout**: each head sees its own dropout mask on the shared rank-r activation z = A x.

The layer computes (s = α/r, the library's LoRA scale; N heads; p = ``head_dropout``)

    z = A x,    ω(x) = softmax(W_g x),    h = W x + s Σ_{j=1..N} ω_j(x) B^j drop_j(z)

where drop_j is an independent inverted dropout (mask m_j ~ Bernoulli(1−p)^r, drop_j(z) = m_j ⊙ z / (1−p))
per head, per token and per sample; in eval mode drop_j is the identity. This is the public code's
forward (``lora_dropout`` applied to ``lora_A(x)`` once per head inside the head loop); HydraLoRA instead
drops x once before A. ``dropout`` (the input dropout every adapter has) stays available and defaults to
0, as in the R-LoRA code. ``bottleneck`` sees z before the head masks (META-LoRA reweighting hooks z and
its gradient, which includes every head's path).

**Initialization** (what we do, and where it differs from the code):

* A and every B^j: the code's default recipe (``fine-tuning.sh``: ``lora_A=unit``, ``lora_B=unit``,
  ``init_scale=stable``, ``stable_gamma=64``): A_ik ~ N(0, 1/in) and B^j_ok ~ N(0, 1/out), each then
  multiplied by r^{1/4}/√γ with γ = ``init_gamma`` (the code's m_A and n_B are both r there). The code
  applies the "stable" factor inside its per-head loop, so A is scaled N times and head j (N − j) times;
  we read that as an indentation slip and apply the factor once to each tensor.
* **The initial update is zero, exactly.** The paper's method keeps the pretrained model's output at the
  start; the code subtracts the mean initial product s·(1/N) Σ_j B^j_0 A_0 from the frozen base weight W.
  That cancels the update only where the router is uniform, which the code's kaiming-initialised router
  is not. We keep W untouched (an adapter here is its own tensors, saved, merged and exported alone) and
  make the cancellation exact instead: the heads are drawn, then centred, B^j_0 = √(N/(N−1)) (G^j − Ḡ)
  (so Σ_j B^j_0 = 0 and every entry keeps variance σ_B²), and the router W_g starts at zero, so
  ω_j = 1/N for every token and s Σ_j ω_j B^j_0 A_0 x = (s/N) (Σ_j B^j_0) A_0 x = 0. The heads still start
  at distinct random points; a zero router still learns (its gradient is ω_j ⟨g, s B^j z − s Σ_k ω_k B^k z⟩ xᵀ,
  nonzero because the heads differ). With N = 1 the centred head is 0 and R-LoRA is LoRA with a
  small-Gaussian A. Not confirmed from the paper's text: whether it centres heads or zero-inits the router
  (neither is in the code); the exact-zero start is our reading of its intent.
* The training script passes ``--rank_stablization True`` (scale α/√r instead of α/r); here the scale is
  always α/r, so set ``alpha`` to α_paper·√r to reproduce that setting. The script's defaults otherwise:
  r = 4, α = 32, dropout 0.1 per head, 5 heads, MLP projections (``configs/r_lora.yaml``).

Like HydraLoRA, the per-token router makes the update input-dependent: R-LoRA cannot be merged or
exported as a PEFT LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metalora.adapters.base import _check, as_sequence, mix_up_projections
from metalora.adapters.hydra_lora import HydraLoRAConfig, HydraLoRALayer


@dataclass
class RLoRAConfig(HydraLoRAConfig):
    """R-LoRA: HydraLoRA with random (centred) heads, a zero router and a dropout mask per head."""

    head_dropout: float = 0.1
    """p of each head's own dropout on z = A x (the code's ``lora_dropout``)."""
    init_gamma: float = 64.0
    """γ of the "stable" init scale r^{1/4}/√γ of A and the heads (the code's ``stable_gamma``)."""

    adapter_type: ClassVar[str] = "r_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        p = self.head_dropout
        ok = isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0
        _check(self, "head_dropout", ok, "a probability in [0, 1)")
        gamma = self.init_gamma
        ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma < math.inf
        _check(self, "init_gamma", ok, "a positive number")


def centred_heads(n: int, out: int, r: int, std: float, **factory) -> torch.Tensor:
    """N random heads [n, out, r] with entries of standard deviation ``std`` that sum to zero over heads."""
    draws = torch.randn(n, out, r, **factory) * std
    if n == 1:
        return torch.zeros_like(draws)
    return (draws - draws.mean(dim=0, keepdim=True)) * math.sqrt(n / (n - 1))


class RLoRALayer(HydraLoRALayer):
    def __init__(self, base_layer: nn.Module, config: RLoRAConfig) -> None:
        super().__init__(base_layer, config)
        r, n = config.r, config.num_heads
        stable = r**0.25 / math.sqrt(config.init_gamma)
        with torch.no_grad():
            self.lora_A.normal_(0.0, stable / math.sqrt(self.in_features))
            heads = centred_heads(
                n, self.out_features, r, stable / math.sqrt(self.out_features), **self.factory
            )
            self.lora_B.copy_(heads)
            self.lora_router.weight.zero_()
        self.head_dropout = config.head_dropout

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        seq, lead = as_sequence(x)  # [B, L, in]
        gate = torch.softmax(self.lora_router(seq), dim=-1)  # [B, L, N]
        z = self.bottleneck(seq @ self.lora_A.T)  # [B, L, r]
        if self.training and self.head_dropout > 0:
            out = self._dropped_heads(z, gate)
        else:
            out = mix_up_projections(z, gate, self.lora_B)
        return (self.scaling * out).reshape(*lead, self.out_features)

    def _dropped_heads(self, z: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Σ_j gate_j B^j drop_j(z): one independent mask per head, token and sample, one matmul."""
        n, out, r = self.lora_B.shape
        per_head = z.unsqueeze(-2).expand(*z.shape[:-1], n, r)  # [B, L, N, r]
        dropped = nn.functional.dropout(per_head, self.head_dropout, training=True)
        mixed = (gate.unsqueeze(-1) * dropped).flatten(-2)  # [B, L, N·r]
        return mixed @ self.lora_B.permute(1, 0, 2).reshape(out, n * r).T
