"""MultiLoRA (Wang et al. 2023, "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning").

    h = W x + (α/r) Σ_{i=1..n} diag(s_i) B^i A^i x

n parallel rank-r LoRAs with learnable per-output scaling vectors s_i ∈ R^{out}. MultiLoRA changes
LoRA's init to lower the dependence on the first parameters: A^i and B^i are both kaiming-uniform and
s_i starts at zero (so the output still equals the base at init). No routing: it is one rank-(n·r) LoRA,
exported as A = [A^1; …; A^n], B = [diag(s_1)B^1 | … | diag(s_n)B^n].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metalora.adapters.base import AdapterConfig, AdapterLayer, _check, kaiming_uniform_, positive_int


@dataclass
class MultiLoRAConfig(AdapterConfig):
    """MultiLoRA: n parallel LoRAs with zero-init learnable scaling."""

    num_parallel: int = 3
    """n, the number of parallel LoRA modules."""

    adapter_type: ClassVar[str] = "multilora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self,
            "num_parallel",
            positive_int(self.num_parallel),
            "a positive integer",
        )


class MultiLoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: MultiLoRAConfig) -> None:
        super().__init__(base_layer, config)
        n, r = config.num_parallel, config.r
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(n, self.out_features, r, **self.factory))
        for i in range(n):
            kaiming_uniform_(self.lora_A.data[i])
            kaiming_uniform_(self.lora_B.data[i])
        self.lora_scale = nn.Parameter(torch.zeros(n, self.out_features, **self.factory))

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, r, _ = self.lora_A.shape
        a = self.lora_A.reshape(n * r, self.in_features)  # [n·r, in]
        b = (self.lora_scale.unsqueeze(-1) * self.lora_B).permute(1, 0, 2).reshape(self.out_features, n * r)
        return a, b

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._stacked()
        z = self.bottleneck(x @ a.T)  # [B, ..., n·r]
        return self.scaling * (z @ b.T)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self._stacked()
        return a, b, self.scaling
