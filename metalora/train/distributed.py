"""The few collective operations the algorithms need, on the process group ``accelerate`` set up.

Gradients are all-reduced explicitly (one flat buffer per call) instead of wrapping the model in DDP:
MeTA-LoRA's averaged gradient comes from several backward passes at *different* parameter values
(θ_i per task) and only the sum over tasks is synchronised, which DDP's per-backward hooks do not
express; doing it once for both algorithms keeps one code path. In a single process every function
here is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; before the process group exists, the launcher's ``RANK`` (torchrun and
    accelerate set it), so that work done before the engine starts (the run directory's lock and files)
    is already done by rank 0 alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of a list every rank holds in full: items[rank::world]."""
    rank_, world = rank() if rank_ is None else rank_, world_size() if world is None else world
    return list(items[rank_::world])


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """In place: each tensor becomes its sum over ranks (one flat all-reduce)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_scalar(value: float, device: torch.device) -> float:
    """A Python number summed over ranks."""
    return float(_reduce_scalar(float(value), torch.float64, dist.ReduceOp.SUM, device))


def max_int(value: int, device: torch.device) -> int:
    """The largest of the ranks' integers."""
    return int(_reduce_scalar(int(value), torch.int64, dist.ReduceOp.MAX, device))


def _reduce_scalar(value: float | int, dtype: torch.dtype, op: Any, device: torch.device) -> float | int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """The global [total, ...] tensor from each rank's rows of ``shard`` (global index rank + j·world)."""
    world = world_size()
    if world == 1:
        return local
    if local.dtype == torch.bool:  # not every backend gathers bool
        return gather_rows(local.to(torch.uint8), total).bool()
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = local.new_zeros((total, *local.shape[1:]))
    for r, part in enumerate(parts):
        count = len(range(r, total, world))
        out[r::world] = part[:count]
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
