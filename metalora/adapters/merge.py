"""Merge an adapter into the base weights, and export it as a plain PEFT LoRA adapter.

Every mergeable adapter is, for a fixed task, a LoRA: ``Δ = scaling · B A`` (``lora_factors``).
``merge`` adds Δ to each wrapped weight (computed in fp32, checked finite, cast to the weight's dtype)
and puts the original module back, returning a plain Hugging Face model. PEFT's own LoRA/DoRA layers
merge with PEFT's ``safe_merge``. ``export_peft`` writes the factors under PEFT's key names and an
``adapter_config.json`` written by ``peft.LoraConfig`` itself, so ``PeftModel.from_pretrained`` loads it.

**A quantized base (QLoRA) has one rule: export the adapter, merge into a dequantized copy.** Its packed
4-/8-bit weights cannot take Δ in place (merging would requantize W + Δ and lose most of Δ to rounding),
so ``merge`` refuses it (``QuantizedBaseError``). ``export_peft`` works as usual: the adapter's tensors
do not depend on the base's storage, and the PEFT adapter loads over a quantized or a full-precision base.
``merge(model, dequantize=True)`` first replaces every bitsandbytes layer by an ``nn.Linear`` holding its
dequantized weight (exactly the W the adapter was trained against), then merges there: a plain HF model,
W_deq + Δ. ``metalora export RUN --merge DIR`` loads the recorded base un-quantized (its original
weights) and merges there.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
from peft import get_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

from metalora import atomic
from metalora.adapters.api import (
    MethodConfig,
    adapter_layers,
    is_full_finetune,
    require_adapter,
    resolve_task,
)
from metalora.adapters.base import AdapterLayer, NotMergeableError
from metalora.adapters.io import base_model_name
from metalora.adapters.lora import PEFT_ADAPTER_NAME, LoRAConfig
from metalora.adapters.quantized import base_quantization, dequantize_model

PEFT_PREFIX = "base_model.model."


def _collect_factors(
    model: nn.Module, task: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """lora_factors of every metalora layer, computed before anything is changed (so errors change nothing)."""
    with torch.no_grad():
        return {
            n: layer.lora_factors(task)
            for n, layer in adapter_layers(model).items()
            if isinstance(layer, AdapterLayer)
        }


class QuantizedBaseError(NotMergeableError):
    """A merge into a bitsandbytes-quantized base (QLoRA) without ``dequantize=True``."""


def merge(
    model: nn.Module, task: int | str | None = None, inplace: bool = False, dequantize: bool = False
) -> nn.Module:
    """A plain HF model with the adapter (for ``task``, where it has per-task parts) folded into the weights.

    By default the adapted model is left untouched and a merged copy is returned; ``inplace=True``
    merges into ``model`` itself (no extra memory). A quantized base (QLoRA) is refused unless
    ``dequantize=True``: every bitsandbytes layer is then dequantized to a plain ``nn.Linear`` (in the
    dtype the model was loaded in) and the adapter merged into that (the module docstring).
    """
    info = require_adapter(model)
    task_id = resolve_task(model, task)
    _collect_factors(model, task_id)  # raises NotMergeableError before any copy is made
    if not dequantize:
        _refuse_quantized(model)
    merged = model if inplace else copy.deepcopy(model)
    if dequantize:
        dequantize_model(merged)
    with torch.no_grad():
        for name, layer in adapter_layers(merged).items():
            base = _merged_base(name, layer, task_id, info.config)
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, base)
    for attr in ("_metalora_adapter", "_metalora_router", "peft_config"):
        if attr in merged.__dict__:
            delattr(merged, attr)
    merged.requires_grad_(True)
    return merged


def _refuse_quantized(model: nn.Module) -> None:
    kind = base_quantization(model)
    if kind:
        raise QuantizedBaseError(
            f"this adapter's base is quantized ({kind}, bitsandbytes): merging into its packed weights "
            "would requantize them and lose the update to rounding. Export the adapter instead "
            "(export_peft, or metalora export RUN --peft DIR), or merge into a dequantized copy: "
            "merge(model, dequantize=True), or metalora export RUN --merge DIR (it loads the base un-quantized)"
        )


def _merged_base(name: str, layer: nn.Module, task_id: int | None, config: MethodConfig) -> nn.Module:
    """The layer's base module with the adapter's update folded into its weight."""
    if not isinstance(layer, AdapterLayer):
        if not isinstance(layer, peft.tuners.lora.Linear):  # PEFT's bnb layer, its base now dequantized
            assert isinstance(config, LoRAConfig)
            layer = _plain_peft_layer(name, layer, config)
        layer.merge(safe_merge=True)
        return layer.get_base_layer()
    base = layer.base_layer
    delta = layer.delta_weight(task_id)
    if not torch.isfinite(delta).all():
        raise ValueError(f"merging {name}: the adapter update has NaN/inf; nothing was merged there")
    base.weight.add_(delta.to(base.weight.dtype))
    return base


def _plain_peft_layer(name: str, layer: nn.Module, config: LoRAConfig) -> nn.Module:
    """PEFT's own ``lora.Linear`` over ``layer``'s (dequantized) base, holding ``layer``'s adapter tensors,
    so PEFT's merge (LoRA or DoRA) runs unchanged."""
    plain = peft.tuners.lora.Linear(
        layer.get_base_layer(),
        PEFT_ADAPTER_NAME,
        config=config.peft_config([name], fan_in_fan_out=False),
        r=config.r,
        lora_alpha=config.alpha,
    )
    plain.load_state_dict(layer.state_dict())
    return plain


def export_peft(model: nn.Module, directory: str | Path, task: int | str | None = None) -> Path:
    """Write a plain PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(base, directory)`` then reproduces this adapter's outputs (for
    ``task``, where the adapter has per-task parts).
    """
    info = require_adapter(model)
    if is_full_finetune(model):
        raise NotMergeableError(
            "a fully fine-tuned model has no low-rank adapter to write as PEFT LoRA: export the whole model "
            "(metalora export RUN --merge DIR, or model.save_pretrained)"
        )
    directory = Path(directory)
    layers = adapter_layers(model)
    conv = {
        name: isinstance(
            layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer, Conv1D
        )
        for name, layer in layers.items()
    }
    fan_in_fan_out = all(conv.values())
    if any(conv.values()) and not fan_in_fan_out:
        raise ValueError(
            "targets mix nn.Linear and Conv1D modules; PEFT's fan_in_fan_out cannot express that"
        )
    if isinstance(info.config, LoRAConfig):
        tensors = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model).items()}
        peft_config = info.config.peft_config(info.targets, fan_in_fan_out)
    else:
        factors = _collect_factors(model, resolve_task(model, task))
        ranks = {a.shape[0] for a, _, _ in factors.values()}
        scalings = {s for _, _, s in factors.values()}
        if len(ranks) != 1 or len(scalings) != 1:
            raise ValueError(
                f"export needs one rank and scaling for all layers, got ranks {ranks}, scalings {scalings}"
            )
        (rank,), (scaling,) = ranks, scalings
        tensors = {}
        for name, (a, b, _) in factors.items():
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        peft_config = peft.LoraConfig(
            r=rank,
            lora_alpha=scaling * rank,
            target_modules=list(factors),
            fan_in_fan_out=fan_in_fan_out,
            lora_dropout=info.config.dropout,
            bias="none",
        )
    peft_config.base_model_name_or_path = base_model_name(model)
    peft_config.task_type = "CAUSAL_LM"
    directory.mkdir(parents=True, exist_ok=True)
    atomic.write_safetensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    peft_config.save_pretrained(str(directory))
    return directory


__all__ = ["merge", "export_peft", "NotMergeableError", "QuantizedBaseError"]
