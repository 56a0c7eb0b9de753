"""What every metalora adapter shares: its config fields and the wrapper around a frozen linear layer.

An ``AdapterLayer`` wraps one ``nn.Linear`` (or GPT-2 ``Conv1D``, or a bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` of a QLoRA base: ``adapters/quantized.py``) and adds a low-rank update:
``h = base(x) + Δ(dropout(x))``. Over a quantized base, ``base(x)`` runs the quantized layer (in its
compute dtype), the adapter tensors are fp32 (as PEFT's QLoRA layers), and Δ is computed in the adapter's
dtype and added in the base output's dtype. A method module implements ``adapter_delta`` (the batched update)
and, where the method collapses to a plain LoRA once a task is fixed, ``lora_factors`` (A, B, scaling
with ``Δ = scaling · B A``), which ``merge`` and ``export_peft`` use. The rank-r activation that feeds the
up-projection passes through ``self.bottleneck`` (an ``nn.Identity``) so that META-LoRA reweighting can
hook z and its gradient without knowing the method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from metalora.adapters.routing import TaskRouter
from metalora.adapters.targets import in_out_features


class AdapterConfigError(ValueError):
    """An adapter config field with a value outside what it allows."""


class NotMergeableError(ValueError):
    """The adapter cannot be written as one plain LoRA (it routes per token, or needs a task)."""


@dataclass
class AdapterConfig:
    """Fields shared by every adapter."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r`` (PEFT's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: str | list[str] | None = None
    """Names (suffix match), a regex (full match), ``"all-linear"``, or None for q,k,v,o."""

    adapter_type: ClassVar[str] = ""
    task_routed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check(self, "r", positive_int(self.r), "a positive integer")
        _check(self, "alpha", positive_number(self.alpha), "a positive number")
        _check(
            self, "dropout", is_number(self.dropout) and 0.0 <= self.dropout < 1.0, "a probability in [0, 1)"
        )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        targets = self.target_modules
        _check(
            self,
            "target_modules",
            targets is None or isinstance(targets, str) or _strings(targets),
            "a module name, a regex, 'all-linear', a list of names, or null",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(known)}")
        return cls(**data)


@dataclass
class TaskRoutedConfig(AdapterConfig):
    """An adapter with per-task parameters: give ``num_tasks`` or ``task_names`` (or both, consistent)."""

    num_tasks: int | None = None
    """Number of tasks (ids 0..num_tasks-1)."""
    task_names: list[str] | None = None
    """Task names, in id order; lets ``task_ids`` take names."""

    task_routed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "task_names", self.task_names is None or _strings(self.task_names), "a list of names")
        if self.task_names is not None:
            self.task_names = list(self.task_names)
            if len(set(self.task_names)) != len(self.task_names):
                raise AdapterConfigError(f"task_names has duplicates: {self.task_names}")
            if self.num_tasks is None:
                self.num_tasks = len(self.task_names)
            elif self.num_tasks != len(self.task_names):
                raise AdapterConfigError(
                    f"num_tasks={self.num_tasks} but task_names has {len(self.task_names)} names"
                )
        _check(
            self,
            "num_tasks",
            positive_int(self.num_tasks),
            "a positive integer (or give task_names)",
        )


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool: YAML's ``true`` is not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_number(value: Any) -> bool:
    return is_number(value) and value > 0


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)


def _check(cfg: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise AdapterConfigError(f"{type(cfg).__name__}.{name}={getattr(cfg, name)!r}: expected {expected}")


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default init (kaiming-uniform with a=√5), LoRA's init for A."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class AdapterLayer(nn.Module):
    """A frozen base linear plus a low-rank update computed by the subclass."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bottleneck = nn.Identity()
        self.router: TaskRouter | None = None
        weight = base_layer.weight
        # Like PEFT's autocast_adapter_dtype: half-precision bases get fp32 adapters; so do quantized
        # ones (bitsandbytes' uint8/int8 weights), as in PEFT's QLoRA layers.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.factory = {"device": weight.device, "dtype": dtype}

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The adapter tensors' dtype now (it follows ``model.to(dtype)`` / ``model.double()``)."""
        return self.lora_A.dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        delta = self.adapter_delta(self.dropout(x.to(self.adapter_dtype)))
        return result + delta.to(result.dtype)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update ``Δ(x)`` for ``x`` of shape [B, ..., in] -> [B, ..., out]."""
        raise NotImplementedError

    def task_ids_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            raise RuntimeError(f"{type(self).__name__} routes by task but has no router attached")
        return self.router.ids_for(x.shape[0], x.device)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r', in], B [out, r'], scaling) with ``Δ = scaling · B A`` for the given task."""
        raise NotMergeableError(f"{type(self).__name__} cannot be written as a plain LoRA")

    def delta_weight(self, task: int | None) -> torch.Tensor:
        """The dense update in the base weight's layout, computed in fp32."""
        a, b, scaling = self.lora_factors(task)
        delta = scaling * (b.float() @ a.float())  # [out, in]
        return delta if isinstance(self.base_layer, nn.Linear) else delta.T  # Conv1D stores [in, out]

    def bottleneck_modules(self) -> list[nn.Module]:
        return [self.bottleneck]


def mix_up_projections(z: torch.Tensor, weights: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i · (up_i z) as one matmul, with no per-sample copy of any projection.

    z: [B, L, r] rank-r activations; weights: [B, L or 1, n] mixing weights; up: [n, out, r].
    The weights scale copies of z (n·r numbers per token), which are then multiplied by the
    concatenated up-projections ``[B^1 | … | B^n]`` ([out, n·r]).
    """
    n, out, r = up.shape
    mixed = (weights.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # [B, L, n·r]
    return mixed @ up.permute(1, 0, 2).reshape(out, n * r).T  # [B, L, out]


def as_sequence(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View x [B, ..., in] as [B, L, in]; returns the view and the original leading shape."""
    lead = x.shape[:-1]
    return x.reshape(x.shape[0], -1, x.shape[-1]), lead
