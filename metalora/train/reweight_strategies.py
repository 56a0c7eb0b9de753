"""The reweighting options, resolved once into small strategy objects (cf. PEFT's ``resolve_lora_variant``).

A step reads four strategies, chosen from the config's nested sections when the step is built, so no
option string is tested again per step:

* a ``Scorer`` (``stats`` and ``direction.score``): what the forward/backward capture per sample and how
  they become u_i — ``SiteScorer`` (ā, ĝ at bottlenecks or dense layers, ``low_rank`` / ``dense``) or
  ``ExactScorer`` (true per-sample gradients, ``exact``);
* a ``ValidationDirection`` (``direction``): the coefficients β of G = Σ_v β_v ∇ℓ_v, or none for the
  paper's β = 1/|V|;
* a ``Weighter`` (``weights``): w from u (Eq. 8, with the published code's shift, and what a batch
  with Σ max(u,0) ≤ δ does: an unweighted step, a skipped step or our uniform fallback);
* an ``UpdateScheme`` (``scheme``): how ∇ Σ_i w_i ℓ_i reaches ``.grad`` — ``FusedUpdate`` (per-sample LoRA
  gradients from the one unweighted backward), ``TwoBackwardUpdate`` (a second, weighted backward) or
  ``ExactUpdate`` (Σ_i w_i of the exact per-sample gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from metalora.train import val_direction
from metalora.train.distributed import gather_rows
from metalora.train.lora_grads import (
    PerSampleLoRAGrads,
    StatCapture,
    fused_supported,
    layer_parameter_names,
    per_sample_grads,
    selected_parameters,
    similarity_sites,
)
from metalora.train.reweight_config import DirectionConfig, ReweightConfig, ReweightConfigError, WeightsConfig
from metalora.train.similarity import (
    SiteStats,
    Weights,
    cosine_scores,
    layer_unit_rows,
    position_weights,
    sample_norms,
    score_weights,
    similarity_scores,
    uniform_weights,
    unit_stats,
)

Grads = dict[str, torch.Tensor]


def backward_grads(loss: torch.Tensor, params: dict[str, nn.Parameter], retain_graph: bool = False) -> Grads:
    """∇ ``loss`` for every adapter tensor (zeros where the backward does not reach it), not into ``.grad``."""
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=retain_graph, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)
    }


@dataclass
class ValidationStats:
    """What the training pass is scored against (global: the same on every rank)."""

    stats: dict[str, SiteStats]
    """Per validation sample ā_v, ĝ_v by site ([|V|, d], all ranks' samples); empty for ``exact``."""
    grad: Grads
    """∇_θ L_V, L_V = (1/|V|) Σ_v ℓ_v, by adapter tensor."""
    loss: float
    """L_V."""
    size: int
    coefficients: torch.Tensor | None = None
    """β [|V|] of ``val_direction`` (float64), or None for the paper's β = 1/|V|."""
    per_sample: torch.Tensor | None = None
    """``exact`` with β: [|V|, P] float64 per-sample gradients of the selected adapter tensors (each layer
    normalised for ``score="layer_cosine"``)."""


@dataclass
class Captured:
    """One batch's forward and unweighted backward on this rank: what scoring and the update read."""

    losses: torch.Tensor
    """ℓ_i [B_local] (its graph kept for ``TwoBackwardUpdate``)."""
    valid: torch.Tensor
    """[B_local] bool: the sample has a loss at all."""
    stats: dict[str, SiteStats]
    """ā_i, ĝ_i by site (``SiteScorer``); empty for ``exact``."""
    rows: Grads | None
    """``exact``: per-sample gradients {name: [B_local, *shape]}; None otherwise."""


# --- scorers -------------------------------------------------------------------------------------------


class Scorer(Protocol):
    def capture(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager: ...

    def captured_stats(self) -> dict[str, SiteStats]: ...

    def validation_backward(
        self, losses: torch.Tensor, params: dict[str, nn.Parameter], need_rows: bool
    ) -> tuple[Grads, torch.Tensor | None]: ...

    def global_stats(self, total: int) -> dict[str, SiteStats]: ...

    def score(self, captured: Captured, val: ValidationStats) -> torch.Tensor: ...


def _same(x: Any) -> Any:
    return x


class SiteScorer:
    """u_i = Σ_l Σ_v β_v (ā_i·ā_v)(ĝ_i·ĝ_v) from statistics captured at the sites (``low_rank``/``dense``)."""

    def __init__(self, model: nn.Module, config: ReweightConfig) -> None:
        stats, direction = config.stats, config.direction
        self._capture = StatCapture(
            similarity_sites(model, stats.similarity, stats.modules), stats.similarity
        )
        self.positions, self.aggregation = stats.positions, direction.aggregation
        self.normalise: Callable[[dict[str, SiteStats]], dict[str, SiteStats]] = (
            unit_stats if direction.score == "layer_cosine" else _same
        )
        self.cosine = direction.score == "cosine"

    def capture(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        return self._capture.capture(
            position_weights(batch["labels"], batch["attention_mask"], self.positions)
        )

    def captured_stats(self) -> dict[str, SiteStats]:
        return self._capture.stats()

    def validation_backward(
        self, losses: torch.Tensor, params: dict[str, nn.Parameter], need_rows: bool
    ) -> tuple[Grads, torch.Tensor | None]:
        return backward_grads(losses.sum(), params), None  # Σ_v ℓ_v: every sample's own ∂ℓ_v at the sites

    def global_stats(self, total: int) -> dict[str, SiteStats]:
        """The validation statistics of all ranks' samples (site-normalised for ``layer_cosine``)."""
        stats = {
            n: SiteStats(gather_rows(s.a, total), gather_rows(s.g, total))
            for n, s in self.captured_stats().items()
        }
        return self.normalise(stats)

    def score(self, captured: Captured, val: ValidationStats) -> torch.Tensor:
        train = self.normalise(captured.stats)
        u = similarity_scores(train, val.stats, self.aggregation, val.coefficients)
        return cosine_scores(u, sample_norms(train)) if self.cosine else u


class ExactScorer:
    """u_i = ⟨∇ℓ_i, Σ_v β_v ∇ℓ_v⟩ over the selected adapter tensors, from true per-sample gradients."""

    def __init__(self, model: nn.Module, config: ReweightConfig) -> None:
        modules, score = config.stats.modules, config.direction.score
        self.chosen = list(selected_parameters(model, modules))
        self.layers = layer_parameter_names(model, modules) if score == "layer_cosine" else None
        self.cosine = score == "cosine"

    def capture(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def captured_stats(self) -> dict[str, SiteStats]:
        return {}

    def rows(self, grads: Grads) -> torch.Tensor:
        """[B, P] float64 per-sample gradients of the selected tensors (each layer at unit norm for
        ``layer_cosine``)."""
        if self.layers is not None:
            return layer_unit_rows(grads, self.layers)
        return torch.cat([grads[n].flatten(1).to(torch.float64) for n in self.chosen], 1)

    def validation_backward(
        self, losses: torch.Tensor, params: dict[str, nn.Parameter], need_rows: bool
    ) -> tuple[Grads, torch.Tensor | None]:
        if not need_rows:
            return backward_grads(losses.sum(), params), None
        grads = per_sample_grads(losses, params)
        return {n: g.sum(0) for n, g in grads.items()}, self.rows(grads)

    def global_stats(self, total: int) -> dict[str, SiteStats]:
        return {}

    def score(self, captured: Captured, val: ValidationStats) -> torch.Tensor:
        grads = captured.rows
        assert grads is not None, "exact scoring needs the per-sample gradients of ExactUpdate"
        if val.coefficients is not None:  # ⟨∇ℓ_i, Σ_v β_v ∇ℓ_v⟩
            assert val.per_sample is not None
            mine = self.rows(grads)
            direction = val.coefficients.to(val.per_sample) @ val.per_sample
            u = mine @ direction.to(mine.device)
        else:
            u = sum(
                (grads[n].flatten(1).to(torch.float64) @ val.grad[n].flatten().to(torch.float64))
                for n in self.chosen
            )
        if not self.cosine:
            return u
        norms = sum(grads[n].flatten(1).to(torch.float64).pow(2).sum(1) for n in self.chosen).sqrt()
        return cosine_scores(u, norms)


# --- validation direction and weights -------------------------------------------------------------------


class ValidationDirection:
    """β of ``val_direction`` from the validation Gram matrix, when an option (or ``layer_cosine``) needs it."""

    def __init__(self, config: DirectionConfig) -> None:
        self.balance, self.shared = config.balance, config.shared
        directed = not val_direction.is_default(config.balance, config.shared)
        self.needed = directed or config.score == "layer_cosine"  # layer_cosine: β = 1/|V| on unit rows

    def coefficients(self, gram: torch.Tensor, groups: Sequence[int] | None) -> torch.Tensor:
        return val_direction.validation_coefficients(gram, groups, self.balance, self.shared)


class Weighter:
    """w from u over the global batch: Eq. 8, w_i = max(u_i,0) / (Σ_j max(u_j,0) + δ), with
    ``weights.negative`` (the published code's shift), ``fallback`` and ``no_signal`` (the Σ ≤ δ cases)."""

    def __init__(self, config: WeightsConfig) -> None:
        self.delta = config.delta
        self.shift = config.negative == "shift"
        self.fallback, self.no_signal = config.fallback, config.no_signal

    def __call__(self, u: torch.Tensor, valid: torch.Tensor, uniform: bool = False) -> Weights:
        """``uniform``: w = 1/B over the valid samples, whatever u (the published unweighted first step)."""
        if uniform:
            return uniform_weights(valid.to(u.device))
        return score_weights(u, valid, self.delta, self.shift, self.fallback, self.no_signal)


# --- update schemes ------------------------------------------------------------------------------------


class UpdateScheme(Protocol):
    name: str

    def capture(self) -> contextlib.AbstractContextManager: ...

    def backward(self, losses: torch.Tensor, params: dict[str, nn.Parameter]) -> Grads | None: ...

    def weighted(self, w: torch.Tensor, captured: Captured, params: dict[str, nn.Parameter]) -> Grads: ...


class FusedUpdate:
    """Σ_i w_i ∇ℓ_i from per-sample LoRA gradients formed in the one unweighted backward (plain PEFT LoRA)."""

    name = "fused"

    def __init__(self, model: nn.Module) -> None:
        self.grads = PerSampleLoRAGrads(model)

    def capture(self) -> contextlib.AbstractContextManager:
        return self.grads.capture()

    def backward(self, losses: torch.Tensor, params: dict[str, nn.Parameter]) -> Grads | None:
        backward_grads(losses.sum(), params)  # the hooks record ā, ĝ and the per-sample gradients
        return None

    def weighted(self, w: torch.Tensor, captured: Captured, params: dict[str, nn.Parameter]) -> Grads:
        return self.grads.weighted(w, params)


class TwoBackwardUpdate:
    """∇ Σ_i w_i ℓ_i by a second backward through the retained graph (any adapter; the published scheme)."""

    name = "two_backward"

    def capture(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, losses: torch.Tensor, params: dict[str, nn.Parameter]) -> Grads | None:
        backward_grads(losses.sum(), params, retain_graph=True)
        return None

    def weighted(self, w: torch.Tensor, captured: Captured, params: dict[str, nn.Parameter]) -> Grads:
        return backward_grads((w.to(captured.losses.dtype) * captured.losses).sum(), params)


class ExactUpdate:
    """Σ_i w_i ∇ℓ_i from the exact per-sample gradients (one backward per sample; small models)."""

    name = "exact"

    def capture(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, losses: torch.Tensor, params: dict[str, nn.Parameter]) -> Grads | None:
        return per_sample_grads(losses, params, retain_graph=False)

    def weighted(self, w: torch.Tensor, captured: Captured, params: dict[str, nn.Parameter]) -> Grads:
        assert captured.rows is not None
        return {n: torch.einsum("b,b...->...", w.to(g), g) for n, g in captured.rows.items()}


# --- resolution ------------------------------------------------------------------------------------------


def resolve_update(model: nn.Module, config: ReweightConfig) -> UpdateScheme:
    """``exact`` for exact similarity; otherwise fused where every adapter tensor is plain PEFT LoRA."""
    if config.stats.similarity == "exact":
        return ExactUpdate()
    supported = fused_supported(model)
    if config.scheme == "fused" and not supported:
        raise ReweightConfigError(
            "reweight.scheme='fused' needs plain PEFT LoRA (no DoRA/metalora layers); use two_backward"
        )
    fused = config.scheme == "fused" or (config.scheme == "auto" and supported)
    return FusedUpdate(model) if fused else TwoBackwardUpdate()


def resolve_scorer(model: nn.Module, config: ReweightConfig) -> Scorer:
    return ExactScorer(model, config) if config.stats.similarity == "exact" else SiteScorer(model, config)
