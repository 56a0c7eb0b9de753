"""Adapters behind one API: PEFT LoRA/DoRA, MTL-LoRA, HydraLoRA, R-LoRA, MultiLoRA, MoELoRA, and full
fine-tuning (type ``none``)."""

from metalora.adapters.api import (
    ADAPTER_TYPES,
    adapter_info,
    adapter_layers,
    adapter_parameters,
    add_adapter,
    is_full_finetune,
    is_task_routed,
    layer_bottlenecks,
    task_names,
)
from metalora.adapters.base import AdapterConfig, AdapterConfigError, AdapterLayer, NotMergeableError
from metalora.adapters.full_finetune import FullFinetuneConfig
from metalora.adapters.hydra_lora import HydraLoRAConfig
from metalora.adapters.io import AdapterLoadError, load_adapter, save_adapter
from metalora.adapters.lora import LoRAConfig
from metalora.adapters.merge import QuantizedBaseError, export_peft, merge
from metalora.adapters.moelora import MoELoRAConfig
from metalora.adapters.mtl_lora import MTLLoRAConfig
from metalora.adapters.multilora import MultiLoRAConfig
from metalora.adapters.r_lora import RLoRAConfig
from metalora.adapters.routing import TaskRoutingError, task_ids
from metalora.adapters.targets import TargetError

__all__ = [
    "ADAPTER_TYPES",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterLayer",
    "AdapterLoadError",
    "FullFinetuneConfig",
    "HydraLoRAConfig",
    "LoRAConfig",
    "MTLLoRAConfig",
    "MoELoRAConfig",
    "MultiLoRAConfig",
    "NotMergeableError",
    "QuantizedBaseError",
    "RLoRAConfig",
    "TargetError",
    "TaskRoutingError",
    "adapter_info",
    "adapter_layers",
    "adapter_parameters",
    "add_adapter",
    "export_peft",
    "is_full_finetune",
    "is_task_routed",
    "layer_bottlenecks",
    "load_adapter",
    "merge",
    "save_adapter",
    "task_ids",
    "task_names",
]
