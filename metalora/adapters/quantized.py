"""bitsandbytes k-bit base layers (QLoRA): recognise them, dequantize them, keep them trainable on CPU.

A quantized base (``load_base(..., quantization="nf4" | "int8")``) holds ``bitsandbytes.nn.Linear4bit``
or ``bitsandbytes.nn.Linear8bitLt`` layers. Both subclass ``nn.Linear`` and keep ``in_features`` and
``out_features`` (their ``weight`` is packed: uint8 ``[in·out/2, 1]`` for NF4, int8 with per-row scales
for int8), so target resolution and the adapters' shapes read them like any linear layer, and an
adapter's forward calls the quantized layer for ``W x``. A packed weight cannot take a merged update:
``merge`` refuses a quantized base; ``merge(..., dequantize=True)`` first replaces every quantized layer by
an ``nn.Linear`` holding its dequantized weight (``dequantize_model``).

bitsandbytes is optional (the ``qlora`` extra) and never imported here: a quantized layer can only exist
once bitsandbytes has been imported, so the checks look the module up in ``sys.modules``.

**CPU repacking, switched off.** bitsandbytes 0.50.2's ``Linear4bit.forward``, on a CPU with AVX512-BF16,
in eval mode and with an input that needs no gradient (an evaluation under ``torch.no_grad``), repacks
the weight in place into a CPU GEMV layout with its absmax rounded to bf16. From then on every forward of
that layer, in training mode too, runs a kernel without a backward: the gradient stops at the layer
(adapters below it silently get none), outputs move by ~1e-3, and ``dequantize_4bit`` no longer reads the
weight (and layers narrower than 64 inputs crash). ``keep_trainable_layout`` switches the repacking off
(``support_avx512bf16_for_cpu = False``); ``load_base`` and ``add_adapter`` call it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("nf4", "int8")
"""The values of ``load_base``'s ``quantization`` (and the run config's ``quantization`` key)."""


def _bnb() -> Any | None:
    """The bitsandbytes module if it has been imported (no quantized layer exists otherwise)."""
    return sys.modules.get("bitsandbytes")


def quantized_kind(module: nn.Module) -> str | None:
    """``"nf4"`` / ``"fp4"`` for a ``Linear4bit``, ``"int8"`` for a ``Linear8bitLt``, else None."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return str(getattr(module.weight, "quant_type", "nf4"))
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def quantized_layers(model: nn.Module) -> list[str]:
    """Full names of the model's bitsandbytes linear layers (inside adapter layers too)."""
    return [name for name, module in model.named_modules() if quantized_kind(module) is not None]


def base_quantization(model: nn.Module) -> str | None:
    """The quantization of the model's base layers (``"nf4"``, ``"int8"``, ...), None for a plain base."""
    kinds = sorted({quantized_kind(m) for m in model.modules()} - {None})
    return ",".join(kinds) or None


def keep_trainable_layout(model: nn.Module) -> None:
    """Switch off bitsandbytes' in-place CPU repacking of ``Linear4bit`` weights (module docstring)."""
    bnb = _bnb()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a bitsandbytes linear layer (4-bit: in its quantization dtype;
    int8: fp32), as bitsandbytes' own dequantization gives it."""
    bnb = _bnb()
    kind = quantized_kind(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes quantized linear layer")
    weight = layer.weight
    if kind == "int8":
        scales = getattr(weight, "SCB", None)
        scales = layer.state.SCB if scales is None else scales
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "this Linear4bit's weight was repacked by bitsandbytes for CPU inference (absmax rounded to bf16) "
            "and cannot be dequantized exactly: load the model with metalora.load_base, or call "
            "metalora.adapters.quantized.keep_trainable_layout(model) before its first evaluation"
        )
    return bnb.functional.dequantize_4bit(weight.data, state)


def dequantize_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` (on the layer's device, in ``dtype``) with the layer's dequantized weight and bias."""
    weight = dequantized_weight(layer).to(dtype)
    plain = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype
    )
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return plain


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer of ``model`` (adapter base layers included) by ``dequantize_linear``
    in place, and drop transformers' quantization record so ``save_pretrained`` writes a plain model.

    ``dtype``: of the new weights; by default the dtype the model was loaded in (``config.dtype``), else fp32.
    """
    dtype = dtype or _loaded_dtype(model)
    for name in quantized_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dequantize_linear(model.get_submodule(name), dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in model.__dict__:
            delattr(model, flag)
    return model


def _loaded_dtype(model: nn.Module) -> torch.dtype:
    value = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32
