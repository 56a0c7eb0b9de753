"""``add_adapter`` and the questions every algorithm asks of an adapted model.

The model is adapted in place and stays the user's Hugging Face class (no wrapper), so ``generate``,
gradient checkpointing and ``save_pretrained`` behave as usual. Everything but the adapter is frozen.
Adapter tensors are the parameters whose name has a ``lora_`` component, for PEFT's layers and ours.
Full fine-tuning (``FullFinetuneConfig``, type ``none``) injects nothing: every parameter trains, and
``adapter_parameters`` is every trainable parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metalora.adapters.base import AdapterConfig, AdapterConfigError, AdapterLayer
from metalora.adapters.full_finetune import FullFinetuneConfig, prepare_full_finetune, trainable_parameters
from metalora.adapters.hydra_lora import HydraLoRAConfig, HydraLoRALayer
from metalora.adapters.lora import LoRAConfig, bottleneck_modules, inject_peft_lora, is_peft_lora_layer
from metalora.adapters.moelora import MoELoRAConfig, MoELoRALayer
from metalora.adapters.mtl_lora import MTLLoRAConfig, MTLLoRALayer
from metalora.adapters.multilora import MultiLoRAConfig, MultiLoRALayer
from metalora.adapters.quantized import base_quantization, keep_trainable_layout
from metalora.adapters.r_lora import RLoRAConfig, RLoRALayer
from metalora.adapters.routing import TaskRouter, find_router
from metalora.adapters.targets import resolve_targets

MethodConfig = AdapterConfig | FullFinetuneConfig
"""A method's config: an adapter's, or full fine-tuning's."""

ADAPTER_TYPES: dict[str, tuple[type[MethodConfig], type[AdapterLayer] | None]] = {
    "lora": (LoRAConfig, None),  # PEFT's layers
    "mtl_lora": (MTLLoRAConfig, MTLLoRALayer),
    "hydra_lora": (HydraLoRAConfig, HydraLoRALayer),
    "r_lora": (RLoRAConfig, RLoRALayer),
    "multilora": (MultiLoRAConfig, MultiLoRALayer),
    "moelora": (MoELoRAConfig, MoELoRALayer),
    "none": (FullFinetuneConfig, None),  # full fine-tuning: nothing injected
}


@dataclass
class AdapterInfo:
    """What ``add_adapter`` did: kept on the model as ``model._metalora_adapter``."""

    config: MethodConfig
    targets: list[str] = field(default_factory=list)


def config_from_dict(adapter_type: str, data: dict[str, Any]) -> MethodConfig:
    if not isinstance(adapter_type, str) or adapter_type not in ADAPTER_TYPES:
        raise AdapterConfigError(f"unknown adapter type {adapter_type!r}; known: {sorted(ADAPTER_TYPES)}")
    return ADAPTER_TYPES[adapter_type][0].from_dict(data)


def add_adapter(model: nn.Module, config: MethodConfig, seed: int | None = None) -> nn.Module:
    """Wrap the config's target modules with the adapter, freeze everything else, return ``model``.

    ``seed``: draw the adapter's random initial tensors (LoRA A, MTL-LoRA's task logits, routers) from
    ``torch.manual_seed(seed)`` inside a forked RNG, so the same seed gives the same adapter in any
    process and the caller's global RNG is left as it was. ``None`` draws from torch's global generator,
    as PEFT does; torch seeds that generator randomly in every new process.
    """
    if not isinstance(config, MethodConfig) or config.adapter_type not in ADAPTER_TYPES:
        raise AdapterConfigError(f"expected one of metalora's adapter configs, got {type(config).__name__}")
    if adapter_info(model) is not None:
        raise AdapterConfigError("this model already has a metalora adapter; load a fresh base model")
    if seed is None:
        _inject(model, config)
    else:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            torch.manual_seed(seed)
            _inject(model, config)
    return model


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _inject(model: nn.Module, config: MethodConfig) -> None:
    quantized = base_quantization(model)
    if isinstance(config, FullFinetuneConfig) and quantized:
        raise AdapterConfigError(
            f"full fine-tuning (adapter type 'none') cannot train this base's {quantized}-quantized weights "
            "(bitsandbytes stores them packed and frozen): load the base without quantization, or train an "
            "adapter over it (QLoRA)"
        )
    keep_trainable_layout(model)
    if isinstance(config, FullFinetuneConfig):
        prepare_full_finetune(model)
        model._metalora_adapter = AdapterInfo(config=config)
        return
    targets = resolve_targets(model, config.target_modules)
    model.requires_grad_(False)
    if isinstance(config, LoRAConfig):
        inject_peft_lora(model, config, targets)
    else:
        layer_cls = ADAPTER_TYPES[config.adapter_type][1]
        router = TaskRouter(config.num_tasks, config.task_names) if config.task_routed else None
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = layer_cls(getattr(parent, child), config)
            layer.router = router
            setattr(parent, child, layer)
        if router is not None:
            model._metalora_router = router
    for name, param in model.named_parameters():
        if _is_adapter_param(name):
            param.requires_grad_(True)
    model._metalora_adapter = AdapterInfo(config=config, targets=targets)
    _keep_checkpointing_inputs_differentiable(model)


def _is_adapter_param(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _keep_checkpointing_inputs_differentiable(model: nn.Module) -> None:
    # With reentrant checkpointing a frozen embedding output would cut the adapter's gradient.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def adapter_info(model: nn.Module) -> AdapterInfo | None:
    return getattr(model, "_metalora_adapter", None)


def require_adapter(model: nn.Module) -> AdapterInfo:
    info = adapter_info(model)
    if info is None:
        raise ValueError("this model has no metalora adapter: call metalora.add_adapter(model, config) first")
    return info


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trainable tensors by name: what an algorithm steps, snapshots and restores (full
    fine-tuning: every trainable parameter of the model, a tied tensor once)."""
    if is_full_finetune(model):
        return trainable_parameters(model)
    return {name: p for name, p in model.named_parameters() if _is_adapter_param(name)}


def is_full_finetune(model: nn.Module) -> bool:
    """Whether the model is set up for full fine-tuning (``adapter: {type: none}``)."""
    return isinstance(require_adapter(model).config, FullFinetuneConfig)


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The wrapped target modules by name (metalora ``AdapterLayer``s or PEFT LoRA layers)."""
    require_adapter(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer) or is_peft_lora_layer(m)}


def layer_bottlenecks(layer: nn.Module) -> list[nn.Module]:
    """Modules whose forward input is the layer's rank-r activation z (hook them for reweighting)."""
    return layer.bottleneck_modules() if isinstance(layer, AdapterLayer) else bottleneck_modules(layer)


def is_task_routed(model: nn.Module) -> bool:
    return find_router(model) is not None


def task_names(model: nn.Module) -> list[str] | None:
    router = find_router(model)
    return None if router is None else router.task_names


def resolve_task(model: nn.Module, task: int | str | None) -> int | None:
    """A task id from an id or a task name (None stays None)."""
    if task is None:
        return None
    router = find_router(model)
    if router is None:
        raise ValueError(f"task={task!r} was given but this adapter does not route by task")
    return int(router.to_tensor([task])[0])
