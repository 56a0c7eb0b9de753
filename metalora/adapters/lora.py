"""LoRA and DoRA through PEFT's own layers.

    h = W x + (α/r) B A x                      (LoRA, Hu et al. 2021)
    h = m ⊙ (W + (α/r) B A) x / ‖W + (α/r) B A‖_c   (DoRA, Liu et al. 2024; ``use_dora=True``)

metalora does not reimplement these: ``peft.inject_adapter_in_model`` wraps the target modules in place
with ``peft.tuners.lora`` layers, so the math, init, merge and file format are PEFT's. Over a quantized
base (QLoRA) PEFT picks its bitsandbytes layers (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``:
the model's ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` tell it), the ones ``get_peft_model`` uses.
DoRA over an int8 base is refused on CPU (a peft/bitsandbytes bug there; ``inject_peft_lora``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import peft
from torch import nn

from metalora.adapters.base import AdapterConfig, AdapterConfigError, _check
from metalora.adapters.quantized import quantized_kind
from metalora.adapters.targets import LINEAR_TYPES

PEFT_ADAPTER_NAME = "default"


@dataclass
class LoRAConfig(AdapterConfig):
    """PEFT LoRA; DoRA with ``use_dora=True``."""

    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    adapter_type: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "use_dora", isinstance(self.use_dora, bool), "true or false")

    def peft_config(self, target_names: list[str], fan_in_fan_out: bool) -> peft.LoraConfig:
        """The equivalent ``peft.LoraConfig`` for these resolved module names."""
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target_names,
            use_dora=self.use_dora,
            fan_in_fan_out=fan_in_fan_out,
            bias="none",
        )


def is_peft_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, peft.tuners.lora.LoraLayer)


def inject_peft_lora(model: nn.Module, config: LoRAConfig, target_names: list[str]) -> None:
    """Wrap the named modules with PEFT LoRA layers, in place."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    conv = [isinstance(modules[n], Conv1D) for n in target_names]
    if any(conv) and not all(conv):
        # PEFT's fan_in_fan_out is one flag per adapter; mixed layouts would need two adapters.
        raise ValueError("targets mix nn.Linear and Conv1D modules; choose targets of one kind for PEFT LoRA")
    assert all(isinstance(modules[n], LINEAR_TYPES) for n in target_names)
    if config.use_dora and any(_int8_on_cpu(modules[n]) for n in target_names):
        raise AdapterConfigError(
            "DoRA over an int8 base needs a GPU: on CPU, peft's DoRA re-reads the int8 weight every forward "
            "and drops its scales (peft 0.21, bitsandbytes 0.50), so the second forward fails; use "
            "quantization nf4 on CPU"
        )
    peft.inject_adapter_in_model(
        config.peft_config(target_names, fan_in_fan_out=all(conv)), model, adapter_name=PEFT_ADAPTER_NAME
    )


def _int8_on_cpu(module: nn.Module) -> bool:
    return quantized_kind(module) == "int8" and module.weight.device.type == "cpu"


def bottleneck_modules(layer: nn.Module) -> list[nn.Module]:
    """The module whose input is LoRA's rank-r activation z = A x: PEFT's ``lora_B``."""
    return [layer.lora_B[PEFT_ADAPTER_NAME]]
