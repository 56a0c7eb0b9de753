"""Run counters as the MeTA-LoRA paper reports them (its Table 7): optimizer steps, samples, tokens, time, memory.

``samples`` counts every sample a forward/backward pass processes: a MeTA-LoRA iteration counts
n·(k·|S| + |Q|) (each support sample once per inner step), a multi-task step its global batch size.
``tokens`` counts the non-padding input tokens of those passes the same way. Optimizer steps count the
steps of the optimizer that updates the saved adapter (for MeTA-LoRA: outer steps). All counts are
global (every rank of a multi-process run agrees on them); wall time accumulates across resumes.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Counters:
    optimizer_steps: int = 0
    samples: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""

    def update(self, samples: int, tokens: int) -> None:
        self.optimizer_steps += 1
        self.samples += samples
        self.tokens += tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counters:
        return cls(**data)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"
