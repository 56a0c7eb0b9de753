"""Full fine-tuning as a method: ``adapter: {type: none}`` in a run recipe, ``FullFinetuneConfig`` in code.

Every parameter of the base model trains; nothing is injected. ``add_adapter(model, FullFinetuneConfig())``
makes every parameter trainable and records the method on the model like any adapter, so the one engine,
its algorithms (LoRA-MT/ST, MeTA-LoRA), checkpoints, ``save_adapter``/``load_adapter``, eval and export
work unchanged:

* **The parameter set.** ``adapter_parameters(model)`` is every parameter with ``requires_grad`` (by
  ``named_parameters()``, which lists a tied tensor once: an ``lm_head`` that shares the input
  embedding's storage appears only as the embedding, so safetensors never sees two views of one storage,
  and copying into the one tensor restores both). That is what the engine steps, snapshots (MeTA-LoRA's
  inner loop copies the whole model's weights) and checkpoints, and what ``save_adapter`` writes: the
  whole model's weights in ``adapter.safetensors``.
* **fp32.** A half-precision base (``dtype: bfloat16`` / ``float16``) is cast to fp32 in place, so the
  parameters and AdamW's state are fp32 (``train.precision: bf16`` still autocasts the forward). A float64
  base stays float64 (the tests' oracles use it).
* **Merge and export.** ``merge`` is the identity (nothing to fold in; it drops the method record), so
  ``metalora export RUN --merge DIR`` writes the whole trained model with ``save_pretrained``
  (safetensors). There is no low-rank adapter to write as PEFT LoRA: ``export_peft`` refuses.
* **Reweighting** (META-LoRA) scores samples by rank-r bottleneck statistics, which a full model does not
  have: a ``reweight`` recipe with ``adapter: {type: none}`` is refused when the recipe is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from metalora.adapters.base import AdapterConfigError

FULL_FINETUNE_TYPE = "none"
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class FullFinetuneConfig:
    """Full fine-tuning: every base parameter trains (in fp32). It has no fields."""

    adapter_type: ClassVar[str] = FULL_FINETUNE_TYPE
    task_routed: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FullFinetuneConfig:
        if data:
            raise AdapterConfigError(
                f"adapter type {FULL_FINETUNE_TYPE!r} (full fine-tuning) takes no fields, got {sorted(data)}: "
                "every parameter of the base model trains"
            )
        return cls()


def prepare_full_finetune(model: nn.Module) -> None:
    """Cast half-precision floating parameters to fp32 and make every parameter trainable, in place."""
    for param in model.parameters():
        if param.dtype in _HALF:
            param.data = param.data.float()
    model.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter by name, a tied tensor once (``named_parameters`` removes duplicates)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
