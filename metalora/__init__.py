"""metalora: multi-task, data-efficient LoRA fine-tuning.

The public names are resolved lazily so that ``import metalora`` stays cheap and a part that needs
an optional package only imports it when used.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT when installed) warns at import on CPUs with AVX512-BF16 that it could not
# fetch an optional kernel from the hub; it falls back to its own kernel, so the line is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_PUBLIC: dict[str, str] = {
    # adapters
    "LoRAConfig": "metalora.adapters",
    "MTLLoRAConfig": "metalora.adapters",
    "HydraLoRAConfig": "metalora.adapters",
    "RLoRAConfig": "metalora.adapters",
    "FullFinetuneConfig": "metalora.adapters",
    "MultiLoRAConfig": "metalora.adapters",
    "MoELoRAConfig": "metalora.adapters",
    "add_adapter": "metalora.adapters",
    "adapter_parameters": "metalora.adapters",
    "is_task_routed": "metalora.adapters",
    "task_names": "metalora.adapters",
    "task_ids": "metalora.adapters",
    "save_adapter": "metalora.adapters",
    "load_adapter": "metalora.adapters",
    "merge": "metalora.adapters",
    "QuantizedBaseError": "metalora.adapters",
    "export_peft": "metalora.adapters",
    # models
    "load_base": "metalora.models",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'metalora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
