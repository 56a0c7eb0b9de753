"""Per-sample task routing without changing Hugging Face forward signatures.

``with task_ids(model, ids):`` puts one task id per sample on a ``TaskRouter`` shared by the model's
task-routed adapter layers (the PEFT ``poly`` idea, but without per-layer hooks: the layers read the
router). Three situations need care:

* **generate**: beam search and ``num_return_sequences`` expand the batch by ``repeat_interleave``; a
  batch that is a whole multiple of the ids is routed the same way.
* **gradient checkpointing**: the recompute happens during ``backward()``, possibly after the ``with``
  block ended. The router therefore remembers the ids of the last forward; a layer running with no
  active ids *inside the autograd engine* (a recompute) uses them. A forward outside backward with no
  ids is an error. Call ``backward()`` inside the ``with`` block to be independent of this rule.
* **names**: ids may be task names; the router maps them with the adapter's ``task_names``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class TaskRoutingError(ValueError):
    """Missing, malformed or out-of-range task ids."""


class TaskRouter:
    """Holds the task ids of the current batch for every task-routed layer of one model."""

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        self.num_tasks = num_tasks
        self.task_names = list(task_names) if task_names is not None else None
        self._active: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    def to_tensor(self, ids: torch.Tensor | Sequence[int] | Sequence[str] | int | str) -> torch.Tensor:
        """Validate ids (ints or task names) and return a ``LongTensor[B]``."""
        if isinstance(ids, (int, str)):
            ids = [ids]
        if not isinstance(ids, torch.Tensor):
            ids = list(ids)
            if any(isinstance(i, str) for i in ids):
                if self.task_names is None:
                    raise TaskRoutingError("task names were given but this adapter has no task_names")
                unknown = [i for i in ids if i not in self.task_names]
                if unknown:
                    raise TaskRoutingError(f"unknown task name(s) {unknown}; known tasks: {self.task_names}")
                ids = [self.task_names.index(i) for i in ids]
            ids = torch.tensor(ids, dtype=torch.long)
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TaskRoutingError(
                f"task ids must be a 1-D integer tensor, got shape {tuple(ids.shape)}, {ids.dtype}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise TaskRoutingError(
                f"task id out of range: got ids in [{int(ids.min())}, {int(ids.max())}], "
                f"the adapter has {self.num_tasks} tasks (valid ids 0..{self.num_tasks - 1})"
            )
        return ids.long()

    def ids_for(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The ids of the current forward, expanded for generate's batch expansion."""
        ids = self._active
        if ids is None:
            if self._last is not None and torch._C._current_graph_task_id() != -1:
                ids = self._last  # gradient-checkpointing recompute inside backward()
            else:
                raise TaskRoutingError(
                    "this adapter routes by task but no task ids were given: wrap the call in "
                    "`with metalora.task_ids(model, ids):` (one id or task name per sample)"
                )
        if ids.numel() != batch_size:
            if ids.numel() and batch_size % ids.numel() == 0:
                ids = ids.repeat_interleave(batch_size // ids.numel())
            else:
                raise TaskRoutingError(
                    f"{ids.numel()} task ids for a batch of {batch_size} samples: give one id per sample"
                )
        return ids.to(device)

    @contextmanager
    def active(self, ids: torch.Tensor) -> Iterator[None]:
        previous = self._active
        self._active = ids
        self._last = ids
        try:
            yield
        finally:
            self._active = previous


def find_router(model: nn.Module) -> TaskRouter | None:
    """The model's task router, or None for an adapter that does not route by task."""
    return getattr(model, "_metalora_router", None)


@contextmanager
def task_ids(
    model: nn.Module, ids: torch.Tensor | Sequence[int] | Sequence[str] | int | str
) -> Iterator[None]:
    """Route each sample of the batches run inside this block to its task (ids or task names, one per sample)."""
    router = find_router(model)
    if router is None:
        raise TaskRoutingError(
            "this model has no task-routed adapter (MTL-LoRA or MoELoRA); task ids have no effect"
        )
    with router.active(router.to_tensor(ids)):
        yield
