"""HydraLoRA (Tian et al. 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning").

    h = W x + (α/r) Σ_{j=1..N} ω_j(x) B^j A x,   ω(x) = softmax(W_g x)

One shared A (kaiming-uniform), N up-projections B^j (zero init), and a dense token-level router
W_g ∈ R^{N×in} (``nn.Linear`` default init). The router looks at each token, so the update differs per
token and cannot be folded into one weight matrix: HydraLoRA is neither mergeable nor exportable to PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metalora.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    NotMergeableError,
    _check,
    as_sequence,
    kaiming_uniform_,
    mix_up_projections,
    positive_int,
)


@dataclass
class HydraLoRAConfig(AdapterConfig):
    """HydraLoRA: shared A, N zero-init B heads, token-level softmax router."""

    num_heads: int = 3
    """N, the number of B heads."""

    adapter_type: ClassVar[str] = "hydra_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "num_heads", positive_int(self.num_heads), "a positive integer")


class HydraLoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: HydraLoRAConfig) -> None:
        super().__init__(base_layer, config)
        r, n = config.r, config.num_heads
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **self.factory)))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r, **self.factory))
        self.lora_router = nn.Linear(self.in_features, n, bias=False, **self.factory)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        seq, lead = as_sequence(x)  # [B, L, in]
        gate = torch.softmax(self.lora_router(seq), dim=-1)  # [B, L, N] per-token router
        z = self.bottleneck(seq @ self.lora_A.T)  # [B, L, r]
        out = mix_up_projections(z, gate, self.lora_B)
        return (self.scaling * out).reshape(*lead, self.out_features)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotMergeableError(
            "HydraLoRA routes every token through a learned softmax router, so its update depends on the "
            "input and is not one fixed matrix: it cannot be merged or exported as a PEFT LoRA"
        )
