"""Find the linear modules an adapter wraps.

Targets follow PEFT's conventions so that an exported adapter's ``target_modules`` means the same thing
under PEFT: a list of names matches a module whose full name equals a name or ends with ``"." + name``;
a single string other than ``"all-linear"`` is a regular expression matched against the full name
(``re.fullmatch``); ``"all-linear"`` takes every linear layer except the output head. ``None`` means the
seeds' default, the attention projections q, k, v, o (on GPT-2, whose attention is fused, ``c_attn`` and
``attn.c_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

DEFAULT_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GPT2_ATTENTION_TARGETS = ("c_attn", "attn.c_proj")
LINEAR_TYPES = (nn.Linear, Conv1D)


class TargetError(ValueError):
    """A target specification that matches nothing, or matches a module that cannot be adapted."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear (``nn.Linear`` or GPT-2 ``Conv1D``) module, output head excluded."""
    head = _output_head_name(model)
    return [name for name, mod in model.named_modules() if isinstance(mod, LINEAR_TYPES) and name != head]


def _output_head_name(model: nn.Module) -> str | None:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return None
    for name, mod in model.named_modules():
        if mod is out:
            return name
    return None


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The q,k,v,o attention projections of this architecture."""
    names = linear_module_names(model)
    if any(n.endswith(".q_proj") for n in names):
        return DEFAULT_ATTENTION_TARGETS
    if any(n.endswith(".c_attn") for n in names):
        return GPT2_ATTENTION_TARGETS
    raise TargetError(
        "metalora has no default q,k,v,o targets for this architecture; pass target_modules "
        f"explicitly. Linear modules of this model: {_summarise(names)}"
    )


def resolve_targets(model: nn.Module, targets: str | Sequence[str] | None) -> list[str]:
    """Full names of the modules to wrap, in model order; a clear error when something matches nothing."""
    names = linear_module_names(model)
    if targets is None:
        targets = default_targets(model)
    if targets == "all-linear":
        chosen = names
    else:
        chosen = [n for n in names if _matches(n, targets)]
        if not isinstance(targets, str):
            unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if unmatched:
                raise TargetError(
                    f"target module(s) {unmatched} match no linear module of this model. "
                    f"Linear modules: {_summarise(names)}"
                )
    if not chosen:
        raise TargetError(f"target {targets!r} matches no linear module. Linear modules: {_summarise(names)}")
    return chosen


def _summarise(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"leaf names {leaves}; e.g. full names {names[:6]}"


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D (whose weight is stored [in, out])."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TargetError(f"cannot adapt a {type(layer).__name__}: only nn.Linear and Conv1D are supported")
