"""Save and load a metalora adapter: ``adapter.safetensors`` plus ``metalora_adapter.json``.

The JSON records the adapter type and config, the base model (name, type and the shape facts that must
match), the resolved target modules with their (in, out) features, the task names and the versions.
Loading checks all of that against the new base before touching it, so an incompatible base is a clear
error listing what does not match. No pickle: tensors are safetensors, the rest JSON. For full
fine-tuning (type ``none``) the tensors are the whole model's trainable weights and there are no targets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

import metalora
from metalora import atomic
from metalora.adapters.api import (
    adapter_info,
    adapter_parameters,
    add_adapter,
    config_from_dict,
    require_adapter,
)
from metalora.adapters.quantized import base_quantization
from metalora.adapters.targets import in_out_features, linear_module_names

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "metalora_adapter.json"
FORMAT_VERSION = 1
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


class AdapterLoadError(ValueError):
    """The adapter directory is unreadable, or does not fit the base model."""


def base_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {k: getattr(text_cfg, k, getattr(cfg, k, None)) for k in _FINGERPRINT_KEYS}


def _target_shapes(model: nn.Module, targets: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for name in targets:
        module = model.get_submodule(name)
        base = (
            module.get_base_layer()
            if hasattr(module, "get_base_layer")
            else getattr(module, "base_layer", module)
        )
        shapes[name] = list(in_out_features(base))
    return shapes


def save_adapter(
    model: nn.Module, directory: str | Path, tensors: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapter's tensors and config to ``directory`` (created if needed).

    ``tensors``: the adapter tensors to write instead of the model's own; a model sharded by FSDP passes
    them gathered (``metalora.train.sharding.full_tensors``, a collective every rank takes part in)."""
    info = require_adapter(model)
    directory = Path(directory)
    tensors = dict(tensors) if tensors is not None else dict(adapter_parameters(model))
    sharded = [name for name, t in tensors.items() if isinstance(t, DTensor)]
    if sharded:
        raise ValueError(
            f"save_adapter: {sharded[0]} is sharded (FSDP): gather the tensors on every rank "
            "(metalora.train.sharding.full_tensors) and pass them as tensors="
        )
    record = {
        "format_version": FORMAT_VERSION,
        "metalora_version": metalora.__version__,
        "torch_version": torch.__version__,
        "adapter_type": info.config.adapter_type,
        "config": info.config.to_dict(),
        "base_model": base_model_name(model),
        "base_fingerprint": _fingerprint(model),
        "base_quantization": base_quantization(model),  # QLoRA: "nf4" / "int8", else None
        "targets": _target_shapes(model, info.targets),
        "task_names": getattr(info.config, "task_names", None),
    }
    atomic.write_safetensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    atomic.write_json(directory / CONFIG_FILE, record)
    return directory


def read_adapter_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterLoadError(
            f"{path} not found: is {directory} a metalora adapter directory (save_adapter)?"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for key in ("adapter_type", "config", "targets"):
        if key not in record:
            raise AdapterLoadError(f"{path}: missing field {key!r}; fields present: {sorted(record)}")
    if not isinstance(record["adapter_type"], str) or not isinstance(record["config"], dict):
        raise AdapterLoadError(f"{path}: 'adapter_type' must be a string and 'config' an object")
    targets = record["targets"]
    if not isinstance(targets, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(type(n) is int for n in v) for v in targets.values()
    ):
        raise AdapterLoadError(f"{path}: 'targets' must map module names to [in_features, out_features]")
    return record


def check_compatible(model: nn.Module, record: dict[str, Any], source: str = "adapter") -> None:
    """Raise ``AdapterLoadError`` listing every way ``model`` differs from the base the adapter was made on."""
    problems = []
    saved_fp, now_fp = record.get("base_fingerprint", {}), _fingerprint(model)
    for key in _FINGERPRINT_KEYS:
        if key in saved_fp and saved_fp[key] != now_fp[key]:
            problems.append(f"{key}: adapter was made for {saved_fp[key]!r}, this base has {now_fp[key]!r}")
    linear = set(linear_module_names(model))
    for name, shape in record["targets"].items():
        if name not in linear:
            problems.append(f"target module {name!r} does not exist in this base")
            continue
        now = list(in_out_features(model.get_submodule(name)))
        if now != list(shape):
            problems.append(
                f"target module {name!r}: adapter expects (in, out)={tuple(shape)}, base has {tuple(now)}"
            )
    if problems:
        raise AdapterLoadError(
            f"{source} (base {record.get('base_model')!r}) does not fit this base model "
            f"({base_model_name(model)!r}):\n  - " + "\n  - ".join(problems[:20])
        )


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_adapter_tensors(path: Path, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, checked by ``check_adapter_tensors`` before any is copied; an unreadable
    file is one line naming it."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({reason})") from None
    check_adapter_tensors(path, tensors, params)
    return tensors


def check_adapter_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]
) -> None:
    """``tensors`` (read from ``path``) against the adapter's parameters: the same names, each of the
    parameter's shape and of a floating-point dtype (cast to the parameter's dtype on copy, so a float64
    adapter loads onto a float32 base). Any mismatch is an ``AdapterLoadError``, one line naming the file
    and the tensor."""
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing:
        raise AdapterLoadError(
            f"{path}: missing tensor {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        raise AdapterLoadError(
            f"{path}: unexpected tensor {unexpected[0]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + " (not a parameter of this adapter)"
        )
    for name, param in params.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterLoadError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterLoadError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected a floating-point dtype "
                f"(the adapter's is {param.dtype})"
            )


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the saved adapter to a fresh base ``model`` and load its tensors; returns ``model``."""
    directory = Path(directory)
    if adapter_info(model) is not None:
        raise AdapterLoadError("this model already has an adapter: load onto a fresh base model")
    record = read_adapter_record(directory)
    check_compatible(model, record, source=str(directory))
    config_dict = dict(record["config"])
    if "target_modules" in config_dict:  # full fine-tuning has no targets
        config_dict["target_modules"] = list(record["targets"])  # the resolved names, exactly
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterLoadError(f"{weights_path} not found")
    add_adapter(model, config_from_dict(record["adapter_type"], config_dict))
    tensors = read_adapter_tensors(weights_path, adapter_parameters(model))
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            param.copy_(tensors[name])
    return model
