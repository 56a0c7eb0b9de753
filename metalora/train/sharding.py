"""Sharded training (``train.sharding: fsdp``): torch's FSDP2 ``fully_shard`` under the engine.

**What is torch's and what is ours.** ``shard_model`` calls FSDP2's ``fully_shard`` on every decoder
layer (the classes the HF model lists in ``_no_split_modules``, as accelerate's transformer auto-wrap
does) and then on the root model. From then on FSDP2 all-gathers each layer's parameters around its
forward and backward, and reduce-scatters the gradients after the backward: every parameter, frozen or
not, is a ``DTensor`` sharded on dim 0, and ``.grad`` is the local shard of the *summed* gradient.
Ours: the gradient divide factor is set to 1 (our losses are normalised by global token counts, so the
ranks' gradients are summed, never averaged, the same contract as the unsharded all-reduce); unused
parameters reduce-scatter zeros (task routing may leave a tensor unused on one rank); the engine skips
its own all-reduce for sharded tensors (``is_sharded``); checkpoints and the final adapter hold *full*
tensors (``full_tensors``: every rank takes part in the gather, rank 0 writes), so their format is the
unsharded one, and they load back into shards by chunking the full tensor locally
(``load_full_``, ``distribute_tensor`` with no communication: every rank read the same file).
The optimizer state is converted the same way (``full_optimizer_state`` / ``shard_optimizer_state``).

Every rank must run every forward and backward (FSDP's collectives pair up across ranks); the
algorithms therefore split the samples *inside* each batch (LoRA-MT: the global batch; MeTA-LoRA: each
episode's support and query sets) and the engine pads a rank's micro-batches with empty ones (no label
token: zero gradient) up to the count of the rank with most.

**The launcher.** ``accelerate launch --config_file`` with ``distributed_type: FSDP`` sets
``ACCELERATE_USE_FSDP=true`` (and ``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``, ...); ``resolve``
turns that into ``fsdp`` (FSDP2 whatever ``FSDP_VERSION`` says; ``FSDP_RESHARD_AFTER_FORWARD`` is
honoured). With a DeepSpeed config it sets ``ACCELERATE_USE_DEEPSPEED=true`` and
``ACCELERATE_DEEPSPEED_ZERO_STAGE`` (or names a DeepSpeed JSON in ``ACCELERATE_DEEPSPEED_CONFIG_FILE``);
``resolve`` turns stage 2 or 3 into ``zero2`` / ``zero3`` (``train/zero.py``), whose DeepSpeed config metalora
builds itself (clipping from ``train.max_grad_norm``); stages 0/1 and CPU/NVMe offload are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

SHARDINGS = ("none", "fsdp", "zero2", "zero3")
TRUE = ("1", "true", "yes")


class ShardingError(ValueError):
    """A sharding setting or launcher configuration metalora does not support."""


@dataclass(frozen=True)
class Sharding:
    """The sharding a run uses and why (``config``: ``train.sharding``; ``accelerate``: the launcher's env)."""

    mode: str
    source: str
    reshard_after_forward: bool = True


def resolve(configured: str, env: Mapping[str, str] | None = None) -> Sharding:
    """``train.sharding``, unless accelerate's launcher asks for FSDP (``fsdp``) or DeepSpeed (``zero2`` /
    ``zero3``)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE:
        return Sharding(f"zero{deepspeed_stage(env)}", "accelerate")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in TRUE
    if env.get("ACCELERATE_USE_FSDP", "").lower() in TRUE:
        return Sharding("fsdp", "accelerate", reshard)
    if configured not in SHARDINGS:
        raise ShardingError(f"train.sharding={configured!r}: expected one of {SHARDINGS}")
    return Sharding(configured, "config", reshard)


def deepspeed_stage(env: Mapping[str, str]) -> int:
    """The ZeRO stage an accelerate DeepSpeed launch asks for (2 or 3); offload and stages 0/1 refused."""
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if file and file.lower() != "none":
        try:
            zero = json.loads(Path(file).read_text(encoding="utf-8")).get("zero_optimization", {})
        except (OSError, ValueError) as exc:
            raise ShardingError(f"the DeepSpeed config {file} (accelerate) cannot be read: {exc}") from None
        stage = zero.get("stage", stage)
        if any(
            zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")
        ):
            raise ShardingError(
                f"{file}: ZeRO offload is not supported by metalora; remove offload_* or set none"
            )
    for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if env.get(key, "none").lower() != "none":
            raise ShardingError(
                f"{key}={env[key]}: ZeRO offload is not supported by metalora; set it to none"
            )
    if str(stage) not in ("2", "3"):
        raise ShardingError(
            f"accelerate launch asked for DeepSpeed ZeRO stage {stage!r}: metalora runs ZeRO-2 or ZeRO-3 "
            "(zero_stage: 2 or 3 in the accelerate config; configs/accelerate/zero3.yaml)"
        )
    return int(stage)


def layer_classes(model: nn.Module) -> set[str]:
    """The decoder-layer class names to wrap: the HF model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ShardingError(
            f"train.sharding=fsdp: {type(model).__name__} lists no _no_split_modules (its decoder layer "
            "classes); a transformers model is needed"
        )
    return names


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root; gradients summed over ranks. In place."""
    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over ranks, not FSDP's default mean
            module.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective for a sharded one: every rank must call it)."""
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full.detach().cpu()


def full_tensors(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor gathered to CPU (every rank calls this, in the same order)."""
    return {name: full_tensor(p) for name, p in params.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like`` (its shard if ``like`` is a DTensor; no communication)."""
    full = full.to(dtype=like.dtype, device=like.device)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def load_full_(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters."""
    for name, p in params.items():
        p.copy_(shard_like(tensors[name], p))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (the unsharded format)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: full_tensor(v) if is_sharded(v) else v for k, v in entry.items()}
        for index, entry in state["state"].items()
    }
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict laid out for this optimizer's (possibly sharded) parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {
        index: {
            k: shard_like(v, params[int(index)]) if _is_param_shaped(v, params[int(index)]) else v
            for k, v in entry.items()
        }
        for index, entry in state["state"].items()
    }
    return out


def _is_param_shaped(value: Any, param: torch.Tensor) -> bool:
    return is_sharded(param) and isinstance(value, torch.Tensor) and value.shape == param.shape
