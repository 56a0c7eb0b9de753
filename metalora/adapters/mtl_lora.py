"""MTL-LoRA (Yang et al. 2024, "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning"), Eq. 4.

For a sample of task t:

    h = W x + (α/r) Σ_{i=1..n} softmax(w_t / τ)_i · B^i Λ_t A x

* A ∈ R^{r×in}: shared down-projection, kaiming-uniform init;
* Λ_t ∈ R^{r×r}: task-specific transform, identity init (``lambda_form="diagonal"`` keeps only its
  diagonal, ones init; ``lambda_form="none"`` fixes Λ_t = I with no parameter: the paper's Table 5
  ablation "w/o Λ_t", where tasks differ only by their mixing weights softmax(w_t/τ));
* B^i ∈ R^{out×r}, i = 1..n: shared up-projections, zero init (so the model starts as the base);
* w_t ∈ R^n: per-task mixing logits, kaiming-uniform init as in the official code; τ: temperature.

Batched for mixed-task batches: A is applied once to the whole batch; Λ_t (r×r) and the task's mixed
up-projection U_t = Σ_i s_ti B^i (out×r, formed once per task per forward, not per sample) are gathered
per sample and applied with batched matmuls. The official code loops over samples and copies A per
sample.

For a fixed task the update is exactly a rank-r LoRA: A_t = A, B_t = Σ_i s_ti B^i Λ_t, which is what
``merge`` and ``export_peft`` write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metalora.adapters.base import (
    AdapterLayer,
    NotMergeableError,
    TaskRoutedConfig,
    _check,
    as_sequence,
    kaiming_uniform_,
    positive_int,
    positive_number,
)

LAMBDA_FORMS = ("full", "diagonal", "none")


@dataclass
class MTLLoRAConfig(TaskRoutedConfig):
    """MTL-LoRA: task-specific Λ_t and n softmax-mixed up-projections."""

    num_up: int = 3
    """n, the number of shared up-projections B^i."""
    temperature: float = 0.1
    """τ of softmax(w_t / τ)."""
    lambda_form: str = "full"
    """``"full"`` r×r Λ_t, ``"diagonal"``, or ``"none"`` (Λ_t = I, not learned: Table 5's ablation)."""

    adapter_type: ClassVar[str] = "mtl_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "num_up", positive_int(self.num_up), "a positive integer")
        _check(self, "temperature", positive_number(self.temperature), "a positive number")
        _check(self, "lambda_form", self.lambda_form in LAMBDA_FORMS, "'full', 'diagonal' or 'none'")


class MTLLoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: MTLLoRAConfig) -> None:
        super().__init__(base_layer, config)
        r, t, n = config.r, config.num_tasks, config.num_up
        self.temperature = float(config.temperature)
        self.diagonal = config.lambda_form == "diagonal"
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **self.factory)))
        self.lora_lambda: nn.Parameter | None = None  # lambda_form "none": Λ_t = I, nothing to learn
        if config.lambda_form != "none":
            lam = (
                torch.ones(t, r, **self.factory)
                if self.diagonal
                else torch.eye(r, **self.factory).repeat(t, 1, 1)
            )
            self.lora_lambda = nn.Parameter(lam)  # [T, r] or [T, r, r]
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r, **self.factory))
        self.lora_mix_logits = nn.Parameter(kaiming_uniform_(torch.empty(t, n, **self.factory)))

    def mixing_weights(self) -> torch.Tensor:
        """softmax(w_t / τ) for every task: [T, n]."""
        return torch.softmax(self.lora_mix_logits / self.temperature, dim=-1)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.task_ids_for(x)  # [B]
        seq, lead = as_sequence(x)  # [B, L, in]
        z = seq @ self.lora_A.T  # [B, L, r]
        if self.lora_lambda is not None:
            lam = self.lora_lambda[ids]  # [B, r] or [B, r, r]
            z = z * lam.unsqueeze(1) if self.diagonal else torch.einsum("blr,bsr->bls", z, lam)  # Λ_t z
        z = self.bottleneck(z)
        up = self.task_up_projections()[ids]  # [B, out, r]: U_t = Σ_i s_ti B^i, gathered per sample
        out = torch.bmm(z, up.transpose(1, 2))  # [B, L, out]
        return (self.scaling * out).reshape(*lead, self.out_features)

    def task_up_projections(self) -> torch.Tensor:
        """U_t = Σ_i softmax(w_t/τ)_i B^i for every task: [T, out, r].

        Mixing the n up-projections per task first (T·n·out·r multiply-adds, independent of the batch)
        leaves one rank-r up-projection per sample, the cost of plain LoRA's, instead of an n·r-wide one.
        """
        return torch.einsum("tn,nor->tor", self.mixing_weights(), self.lora_B)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        if task is None:
            raise NotMergeableError(
                "MTL-LoRA has task-specific parameters: pass task= (a task id or name) to merge or export"
            )
        b_mix = self.task_up_projections()[task]  # Σ_i s_ti B^i
        if self.lora_lambda is None:
            return self.lora_A, b_mix, self.scaling
        lam = self.lora_lambda[task]
        b_t = b_mix * lam if self.diagonal else b_mix @ lam  # B_t = (Σ_i s_ti B^i) Λ_t
        return self.lora_A, b_t, self.scaling
