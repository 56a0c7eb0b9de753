"""LoRAHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition"): one weight per library adapter, learnt from k examples of a new task without gradients.

COMPOSE, per adapted module m, from the N library LoRAs (A_j [r, in], B_j [out, r], one α and r):

    A = Σ_j w_j A_j,    B = Σ_j w_j B_j,    h = W x + (α / r) · B A x

both factors are weighted sums (the paper's m̂ and its code's ``get_final_weights``), not Σ_j w_j B_j A_j.

ADAPT: w* = argmin over w ∈ [-1.5, 1.5]^N, starting from w = 0, of

    L(w) + λ · Σ_j |w_j|        (``objective="paper"``, λ = ``l1`` = 0.05)

with L(w) the mean next-token cross-entropy over every response token of the k examples (prompt tokens
masked, as in training), under a budget of ``budget`` (40) evaluations of nevergrad's ``NGOpt``.

What is whose. Hand-written here: the composition (each library tensor stacked once, one ``tensordot``
per adapter tensor per candidate, copied under ``torch.no_grad`` into a PEFT LoRA injected once, so the
model is never re-wrapped), the objective (tokenization, collation and ``token_loss_rows`` are metalora's
own, as in training), the ask/tell loop, and the choice of the returned weights: the best candidate
evaluated (the objective is deterministic), recorded per step. From nevergrad: the optimiser, exactly as
the authors call it: ``NGOpt`` on ``ng.p.Array(init=0, lower=-1.5, upper=1.5)`` with ``budget``, one
worker; its own ``provide_recommendation()`` is recorded beside ours. In nevergrad 1.0.12 NGOpt picks
Cobyla for these budgets and sizes (the paper names CMA-ES); Cobyla's first point is the initial w = 0,
so step 0 is the base model's loss and the result is never worse than the base on the k examples.

The authors' package (PyPI ``lorahub==0.1.0``, ``lorahub/algorithm.py``) differs in two places, both
available here as ``objective="lorahub_code"``: its loss is summed over batches and divided by the number
of examples (one batch by default: L / k), and its penalty is ``0.05 · mean_j |w_j|`` (Σ_j |w_j| / N).
It returns NGOpt's recommendation rather than the best point seen. It cannot run on our adapters as
published: ``load_base_model_and_lora_modules`` and ``lorahub_inference`` hard-code
``AutoModelForSeq2SeqLM`` (FLAN-T5), which refuses a causal LM, and ``load_dataset`` tokenizes inputs and
outputs separately as encoder inputs and decoder labels, which for a decoder-only model are neither
aligned nor prompt-masked. With a causal-LM class substituted and our loss passed as its ``get_loss``
hook it runs, and shows a bug of its own (with PEFT 0.21): it wraps one base model once per adapter, so
its cached state dict of the *last* adapter is a view of the live LoRA tensors, and every composition
uses the previous candidate in that adapter's place; its merged result then does not match the weights
it returns. With that cache copied as well, it visits the same weights with the same losses as ours
(``objective="lorahub_code"``), recommends the same weights and merges to our logits, in float64
(``tests/test_compose.py::test_matches_the_authors_lorahub_package``, optional: it needs ``lorahub``
importable, e.g. ``pip install --no-deps --target DIR lorahub==0.1.0`` and ``PYTHONPATH=DIR``). In float32
the two paths agree for the first steps and then part on rounding (its sums are sequential, ours a
``tensordot``). On SmolLM2-135M, three LoRA-ST adapters (sst2, boolq, sciq; r=8, 8 steps) weighed for
arc_easy from 5 examples with budget 40: base loss 0.820; ours 0.209 (``paper``), 0.213
(``lorahub_code``); the package with both fixes 0.216 (its recommendation), without the cache fix its
returned weights give 0.236 and its merged model 1.159.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import nevergrad as ng
import numpy as np
import torch
from torch import nn

from metalora.adapters import LoRAConfig, adapter_parameters, add_adapter
from metalora.adapters.lora import PEFT_ADAPTER_NAME
from metalora.compose.library import LibraryAdapter, check_base
from metalora.data import Example, collate, tokenize_examples
from metalora.train.loss import token_loss_rows

OBJECTIVES = ("paper", "lorahub_code")


@dataclass
class LoRAHubConfig:
    """The search: budget, penalty, bounds, seed, objective."""

    budget: int = 40
    """Objective evaluations (the authors' ``max_inference_step``, 40 by default)."""
    l1: float = 0.05
    """λ of the L1 penalty (the authors' 0.05)."""
    bound: float = 1.5
    """Every weight lies in [-bound, bound] (the authors' 1.5)."""
    seed: int = 0
    """Seeds the parametrization's random state (NGOpt's choice and any randomised sub-optimiser)."""
    objective: str = "paper"
    """``paper``: L + λ Σ|w|. ``lorahub_code``: L / k + λ mean|w|, as ``lorahub==0.1.0`` computes it."""
    batch_size: int | None = None
    """Examples per forward (None: all k in one batch). The pooled loss does not depend on it."""

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget={self.budget!r}: expected a positive number of evaluations")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise ValueError(f"l1={self.l1!r}: expected a non-negative number")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound={self.bound!r}: expected a positive number")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: choose one of {list(OBJECTIVES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: expected a positive number or None")


def l1_penalty(weights: Sequence[float], config: LoRAHubConfig) -> float:
    """λ Σ_j |w_j| (``paper``) or λ Σ_j |w_j| / N (``lorahub_code``)."""
    absolute = np.abs(np.asarray(weights, dtype=np.float64))
    return config.l1 * float(absolute.mean() if config.objective == "lorahub_code" else absolute.sum())


def objective_value(loss: float, weights: Sequence[float], k: int, config: LoRAHubConfig) -> float:
    """What the optimiser minimises: L + λ Σ|w| (``paper``) or L / k + λ mean|w| (``lorahub_code``)."""
    scaled = loss / k if config.objective == "lorahub_code" else loss
    return scaled + l1_penalty(weights, config)


class ComposedLoRA:
    """The base model wrapped once with a PEFT LoRA of the library's shape; ``set_weights(w)`` writes
    A = Σ_j w_j A_j and B = Σ_j w_j B_j into it. The model is adapted in place (``add_adapter``)."""

    def __init__(self, model: nn.Module, library: Sequence[LibraryAdapter]) -> None:
        ref = library[0]
        check_base(model, ref)
        add_adapter(model, LoRAConfig(r=ref.r, alpha=ref.lora_alpha, target_modules=list(ref.factors)))
        params = adapter_parameters(model)
        self.model = model.eval()
        self.names = [adapter.name for adapter in library]
        self._stacks: list[tuple[nn.Parameter, torch.Tensor]] = []
        for module in ref.factors:
            for index, part in enumerate(("lora_A", "lora_B")):
                param = params[f"{module}.{part}.{PEFT_ADAPTER_NAME}.weight"]
                tensors = [
                    adapter.factors[module][index].to(param.device, param.dtype) for adapter in library
                ]
                self._stacks.append((param, torch.stack(tensors)))  # [N, *shape]

    def set_weights(self, weights: Sequence[float]) -> None:
        """Copy the weighted sums of every library tensor into the model's LoRA."""
        if len(weights) != len(self.names):
            raise ValueError(
                f"expected {len(self.names)} weights, one per library adapter, got {len(weights)}"
            )
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        with torch.no_grad():
            for param, stack in self._stacks:
                param.copy_(torch.tensordot(w.to(device=stack.device, dtype=stack.dtype), stack, dims=1))


def few_shot_batches(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int | None = None,
    max_length: int | None = 1024,
    template: str = "plain",
) -> list[dict[str, Any]]:
    """The examples tokenized (prompt-masked labels) and collated once, ``batch_size`` per batch."""
    features, _ = tokenize_examples(examples, tokenizer, max_length=max_length, template=template)
    if not any(any(label != -100 for label in f["labels"]) for f in features):
        raise ValueError("the few-shot examples have no response token to score (all labels masked)")
    size = batch_size or len(features)
    return [collate(features[i : i + size], tokenizer.pad_token_id) for i in range(0, len(features), size)]


def response_loss(model: nn.Module, batches: Sequence[dict[str, Any]]) -> float:
    """L: the mean next-token cross-entropy over every response token of ``batches`` (pooled)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            sums, counts = token_loss_rows(logits, batch["labels"])
            total, count = total + float(sums.sum()), count + int(counts.sum())
    return total / count


@dataclass
class Step:
    """One evaluation of the search."""

    step: int
    weights: list[float]
    loss: float
    penalty: float
    objective: float


@dataclass
class CompositionResult:
    """The learnt weights (the best step's), every step, and NGOpt's own recommendation."""

    names: list[str]
    history: list[Step]
    best_step: int
    recommendation: list[float]
    config: LoRAHubConfig
    k: int

    @property
    def best(self) -> Step:
        return self.history[self.best_step]

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.best.weights, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "best": asdict(self.best),
            "base_loss": self.history[0].loss if not any(self.history[0].weights) else None,
            "nevergrad_recommendation": dict(zip(self.names, self.recommendation, strict=True)),
            "config": asdict(self.config),
            "k": self.k,
            "history": [asdict(step) for step in self.history],
        }


def search(
    loss_fn: Callable[[np.ndarray], float], names: Sequence[str], k: int, config: LoRAHubConfig
) -> CompositionResult:
    """NGOpt over w ∈ [-bound, bound]^N (one weight per name) from w = 0, ``config.budget`` evaluations
    of ``loss_fn``; the best step is the first minimum of the objective."""
    parametrization = ng.p.Array(init=np.zeros(len(names)), lower=-config.bound, upper=config.bound)
    parametrization.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=config.budget, num_workers=1)
    history: list[Step] = []
    with warnings.catch_warnings():  # scipy's Cobyla (NGOpt's pick) warns about nevergrad's settings
        warnings.filterwarnings("ignore", message="COBYLA: Invalid")  # RHOEND; MAXFUN < N + 2
        for step in range(config.budget):
            candidate = optimizer.ask()
            weights = np.asarray(candidate.value, dtype=np.float64)
            loss = float(loss_fn(weights))
            value = objective_value(loss, weights, k, config)
            optimizer.tell(candidate, value if math.isfinite(value) else math.inf)
            history.append(Step(step, weights.tolist(), loss, l1_penalty(weights, config), value))
        recommendation = np.asarray(optimizer.provide_recommendation().value, dtype=np.float64).tolist()
    scores = [s.objective if math.isfinite(s.objective) else math.inf for s in history]
    best = int(np.argmin(scores))  # the first minimum
    return CompositionResult(list(names), history, best, recommendation, config, k)


def compose(
    model: nn.Module,
    library: Sequence[LibraryAdapter],
    batches: Sequence[dict[str, Any]],
    config: LoRAHubConfig,
) -> tuple[ComposedLoRA, CompositionResult]:
    """LoRAHub on ``model`` (adapted in place): the best weights found are left in its LoRA."""
    composed = ComposedLoRA(model, library)
    k = sum(len(batch["sample_ids"]) for batch in batches)

    def loss_at(weights: np.ndarray) -> float:
        composed.set_weights(weights)
        return response_loss(composed.model, batches)

    result = search(loss_at, composed.names, k, config)
    composed.set_weights(result.best.weights)
    return composed, result
