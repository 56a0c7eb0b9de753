"""MoELoRA (Liu et al. 2023, "MOELoRA: An MoE-based Parameter Efficient Fine-Tuning Method for
Multi-task Medical Applications").

    h = W x + (α/r) Σ_{j=1..N} ω_tj B_j A_j x,   ω_t = softmax(W_g E[t])

N LoRA experts of rank r/N each (together rank r), A_j ~ N(0, 0.01²) and B_j = 0 as in the official
code; a task-motivated gate: task embedding E ∈ R^{T×d} (``nn.Embedding`` init) and gate W_g ∈ R^{N×d}.
Each adapted layer has its own embedding and gate (the official code does the same).

The gate depends on the task only, never on the token, so for a fixed task MoELoRA *is* a rank-r LoRA:
A_t = [A_1; …; A_N], B_t = [ω_t1 B_1 | … | ω_tN B_N]. metalora therefore merges and exports it per task
(the official code also has a per-task ``merge``); without a task it is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metalora.adapters.base import AdapterLayer, NotMergeableError, TaskRoutedConfig, _check, positive_int


@dataclass
class MoELoRAConfig(TaskRoutedConfig):
    """MoELoRA: rank-r/N LoRA experts mixed by a task-embedding gate."""

    num_experts: int = 4
    """N; must divide r."""
    task_embedding_dim: int = 64
    """d, the width of the task embedding that feeds the gate."""

    adapter_type: ClassVar[str] = "moelora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self,
            "num_experts",
            positive_int(self.num_experts) and self.r % self.num_experts == 0,
            f"a positive integer that divides r={self.r}",
        )
        _check(
            self,
            "task_embedding_dim",
            positive_int(self.task_embedding_dim),
            "a positive integer",
        )


class MoELoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: MoELoRAConfig) -> None:
        super().__init__(base_layer, config)
        self.num_experts = config.num_experts
        self.expert_rank = config.r // config.num_experts
        self.lora_A = nn.Parameter(torch.randn(config.r, self.in_features, **self.factory) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **self.factory))  # [B_1|…|B_N]
        self.lora_task_embedding = nn.Embedding(config.num_tasks, config.task_embedding_dim, **self.factory)
        self.lora_gate = nn.Linear(config.task_embedding_dim, config.num_experts, bias=False, **self.factory)

    def gate_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """ω for each id, repeated over each expert's rank: [len(ids), r]."""
        omega = torch.softmax(self.lora_gate(self.lora_task_embedding(ids)), dim=-1)  # [B, N]
        return omega.repeat_interleave(self.expert_rank, dim=-1)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.task_ids_for(x)
        z = self.bottleneck(x @ self.lora_A.T)  # [B, ..., r]: the N experts' activations side by side
        w = self.gate_weights(ids).reshape(ids.shape[0], *([1] * (x.dim() - 2)), -1)
        return self.scaling * ((w * z) @ self.lora_B.T)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        if task is None:
            raise NotMergeableError("MoELoRA's gate depends on the task: pass task= to merge or export")
        w = self.gate_weights(torch.tensor([task], device=self.lora_A.device))[0]  # [r]
        return self.lora_A, self.lora_B * w, self.scaling
