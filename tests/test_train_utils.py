"""Shared helpers of the training tests (tiny features, fixed samplers, run helpers) and their own checks."""

from __future__ import annotations

import torch

from metalora.adapters import adapter_parameters
from metalora.testing import VOCAB
from metalora.train.batching import count_tokens
from metalora.train.loss import count_label_tokens

PAD = 0

# Tiny models on shared cores: torch's intra-op thread pool oversubscribes the CPU and makes a
# 32-wide model ~20x slower; one thread is the fast setting for these sizes.
torch.set_num_threads(1)


def make_features(
    task: str, task_id: int, n: int, length: int = 12, prompt: int = 4, seed: int = 0, vary: bool = False
) -> list[dict]:
    """n random features; the first ``prompt`` tokens are masked. ``vary`` gives lengths length-3..length."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = length - int(torch.randint(0, 4, (1,), generator=gen)) if vary else length
        ids = torch.randint(2, VOCAB, (size,), generator=gen).tolist()
        out.append(
            {
                "input_ids": ids,
                "labels": [-100] * prompt + ids[prompt:],
                "task_id": task_id,
                "sample_id": f"{task}/{i}",
            }
        )
    return out


def make_pools(
    n_tasks: int = 3, per_task: int = 20, length: int = 12, vary: bool = False
) -> dict[str, list[dict]]:
    return {
        f"t{t}": make_features(f"t{t}", t, per_task, length, seed=100 + t, vary=vary) for t in range(n_tasks)
    }


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_parameters(model).items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


class FailAt:
    """Wraps a sampler; raises on its ``fail_at``-th call of ``sample`` (0-based) to simulate a crash."""

    def __init__(self, sampler, fail_at: int) -> None:
        self.sampler, self.fail_at, self.calls = sampler, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def sample(self):
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return self.sampler.sample()


def test_feature_counts_against_hand_count():
    feats = make_features("a", 0, 3, length=10, prompt=4)
    assert count_tokens(feats) == 30
    assert count_label_tokens(feats) == 3 * 6  # positions 4..9 are labels; position 0 is never a target
