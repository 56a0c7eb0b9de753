"""DeepSpeed ZeRO-2/3 under the engine (``train.sharding: zero2 | zero3``, or ``accelerate launch`` with a
DeepSpeed config): LoRA-MT and LoRA-ST.

**What is DeepSpeed's and what is ours.** ``deepspeed.initialize`` wraps the model and the engine's own
AdamW (a client optimizer): ZeRO-2 partitions the adapter's gradients and AdamW state over the processes,
ZeRO-3 also every parameter, frozen base included (gathered around each layer's forward and backward by
DeepSpeed's hooks). DeepSpeed reduces the gradients at the accumulation boundary (the last micro-batch of
a step, ``set_gradient_accumulation_boundary``), clips them (``gradient_clipping`` = ``train.max_grad_norm``:
the same coefficient as torch's ``clip_grad_norm_``) and steps. Ours: DeepSpeed *averages* gradients over
the ranks while our losses are normalised by global token counts (summed, never averaged: the same contract
as the unsharded all-reduce and FSDP), so each backward's loss is multiplied by the world size; the engine's
LR schedule drives the client optimizer's param groups, which DeepSpeed keeps; the NaN/inf guard reads
the full gradient norm before DeepSpeed steps.

**Checkpoints** stay metalora's (safetensors + JSON, no pickle): full fp32 adapter tensors
(``safe_get_full_fp32_param``) and a torch ``AdamW.state_dict()`` of full tensors
(``safe_get_full_optimizer_state``), the same format as an unsharded run, so a ZeRO run resumes in one
process and the other way round. DeepSpeed's own checkpoints are not used: they load with pickle. Resuming
loads the adapter into the model *before* ``deepspeed.initialize`` (so ZeRO-3 partitions the restored
tensors), then creates DeepSpeed's optimizer state with one step of zero gradients at learning rate 0 (it
moves nothing) and overwrites it with the saved moments and step count (``safe_set_full_optimizer_state``).

Written by hand because no library maps DeepSpeed's partitioned state to an unsharded, pickle-free
checkpoint. DeepSpeed keeps an fp32 master copy: a float64 model trains in fp32 under ZeRO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

STAGES = {"zero2": 2, "zero3": 3}


class ZeroError(ValueError):
    """A DeepSpeed setting metalora does not support, or DeepSpeed missing."""


def import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise ZeroError(
            f"train.sharding=zero2/zero3 needs DeepSpeed, which cannot be imported ({exc}); install it with "
            "`pip install --no-build-isolation deepspeed` (keeps the installed torch), or use train.sharding=fsdp"
        ) from None
    return deepspeed


def ds_config(stage: int, max_grad_norm: float | None) -> dict[str, Any]:
    """The DeepSpeed config metalora builds: ZeRO ``stage``, clipping, micro-batching left to the engine."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # the engine cuts micro-batches itself; this only sizes logs
        "gradient_accumulation_steps": 1,  # boundaries are set by the engine, once per optimizer step
        "zero_optimization": {"stage": stage},
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class Zero:
    """One model and its client AdamW wrapped by ``deepspeed.initialize``; what the engine calls instead of
    its own backward, all-reduce, clip and step."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, stage: int, max_grad_norm: float | None
    ) -> None:
        self.deepspeed = import_deepspeed()
        self.stage = stage
        self.client = optimizer
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(stage, max_grad_norm), dist_init_required=False
        )
        self.world_size = self.engine.world_size

    def __call__(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """∇ loss (summed over ranks, not averaged); ``boundary``: the step's last micro-batch, after which
        DeepSpeed reduces the gradients."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def grad_norm(self, params: Mapping[str, nn.Parameter]) -> float:
        """The global 2-norm of the reduced gradients (every rank calls this, in the same order)."""
        utils = self.deepspeed.utils
        total = 0.0
        for p in params.values():
            grad = utils.safe_get_full_grad(p)
            if grad is not None:
                total += float(grad.double().pow(2).sum())
        return math.sqrt(total)

    def step(self) -> None:
        """Clip (DeepSpeed's ``gradient_clipping``), AdamW step, zero the gradients."""
        self.engine.step()

    def full_params(self, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Every adapter tensor, full and fp32, on CPU (a collective under ZeRO-3)."""
        get = self.deepspeed.utils.safe_get_full_fp32_param
        return {name: get(p).detach().cpu().to(p.dtype) for name, p in params.items()}

    def optimizer_state(self, params: Mapping[str, nn.Parameter]) -> dict[str, Any]:
        """A torch ``AdamW.state_dict()`` of ``params`` in order, full tensors: the unsharded format."""
        get = self.deepspeed.utils.safe_get_full_optimizer_state
        steps = [s["step"] for s in self.client.state.values() if "step" in s]
        state: dict[int, dict[str, Any]] = {}
        if steps:  # no state before the first step, as in torch
            step = steps[0].detach().clone().cpu()
            for index, p in enumerate(params.values()):
                moments = {k: get(p, k).detach().cpu().to(p.dtype) for k in ("exp_avg", "exp_avg_sq")}
                state[index] = {"step": step.clone(), **moments}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.client.param_groups]
        groups[0]["params"] = list(range(len(params)))
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(
        self, params: Mapping[str, nn.Parameter], saved: Mapping[str, Any], prime: Callable[[], None]
    ) -> None:
        """Restore ``optimizer_state``'s output. ``prime()`` runs one forward and backward with no label token
        (zero gradients, at a boundary): with the learning rate at 0 the step it precedes moves nothing but
        creates DeepSpeed's state, which the saved moments and step count then overwrite."""
        for group, saved_group in zip(self.client.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        if not saved["state"]:
            return
        rates = [g["lr"] for g in self.client.param_groups]
        for g in self.client.param_groups:
            g["lr"] = 0.0
        prime()
        self.step()
        for g, lr in zip(self.client.param_groups, rates, strict=True):
            g["lr"] = lr
        put = self.deepspeed.utils.safe_set_full_optimizer_state
        entries = {int(k): v for k, v in saved["state"].items()}
        for index, p in enumerate(params.values()):
            for key in ("exp_avg", "exp_avg_sq"):
                put(p, entries[index][key].to(torch.float32), key)
        for s in self.client.state.values():
            s["step"] = entries[0]["step"].clone().to(s["step"].dtype)
