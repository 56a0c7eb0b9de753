"""The ``reweight:`` section of a run config: typed, nested, validated once.

    reweight:
      batch_size: 8            val_ratio: 10        val_batch_size: null
      scheme: auto             seed: 0              log_weights: true    group_by_length: false
      stats:          {similarity: low_rank, modules: all, positions: response}
      direction:      {aggregation: per_sample, balance: none, shared: keep, score: dot}
      weights:        {negative: clip, fallback: skip, no_signal: unweighted, delta: 1.0e-30}
      published_code: {unweighted_first_step: false, val_step_every: 0, val_refresh_every: 1}

``stats`` says what is captured per sample (ā, ĝ), ``direction`` what a sample is scored against and how,
``weights`` how u becomes w, ``published_code`` the published code's step-level choices. Every section
validates itself in ``__post_init__`` with a message naming ``reweight.<section>.<key>`` and the values it
allows. ``ReweightConfig.from_dict`` also accepts the old flat keys (``reweight.similarity`` …), each with a
``FutureWarning`` naming its new place; ``to_dict`` writes the nested form, and the two round-trip.
The options are turned into strategy objects once, in ``reweight_strategies.resolve``.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metalora.train import similarity as sim
from metalora.train import val_direction
from metalora.train.lora_grads import MODULE_SUBSETS, SITE_KINDS
from metalora.train.typed import FieldTypeError, coerce_fields

SIMILARITIES = (*SITE_KINDS, "exact")
SCHEMES = ("auto", "fused", "two_backward")
SCORES = ("dot", "cosine", "layer_cosine")
VAL_RATIOS_DOC = "5:1, 10:1 (default), 50:1"


class ReweightConfigError(ValueError):
    """A reweighting setting outside what it allows."""


def _check(section: str, checks: list[tuple[str, bool, str]], values: object) -> None:
    for name, ok, expected in checks:
        if not ok:
            raise ReweightConfigError(f"{section}.{name}={getattr(values, name)!r}: expected {expected}")


@dataclass
class StatsConfig:
    """``reweight.stats``: the per-sample statistics ā_i, ĝ_i captured at every site."""

    similarity: str = "low_rank"
    """``low_rank`` (L: bottleneck z and ∂ℓ/∂z), ``dense`` (D: layer input x and ∂ℓ/∂h), ``exact`` (reference)."""
    modules: str = "all"
    """Adapter layers that contribute to u: ``all``, ``attention`` or ``mlp``."""
    positions: str = "response"
    """Token reduction: ``response`` (paper), ``nonpad``, ``all`` (published code: mean over every position)."""

    def __post_init__(self) -> None:
        _check(
            "reweight.stats",
            [
                ("similarity", self.similarity in SIMILARITIES, f"one of {SIMILARITIES}"),
                ("modules", self.modules in MODULE_SUBSETS, f"one of {MODULE_SUBSETS}"),
                ("positions", self.positions in sim.POSITIONS, f"one of {sim.POSITIONS}"),
            ],
            self,
        )


@dataclass
class DirectionConfig:
    """``reweight.direction``: what a training sample is scored against, and the score's form."""

    aggregation: str = "per_sample"
    """``per_sample`` (mean over v of the products) or ``mean`` (published code: product of the means)."""
    balance: str = "none"
    """``none`` (paper) or ``answer`` (our option): validation samples grouped by answer, each answer pulls
    with unit strength, so the validation batch's net residual on the answer drops out of u
    (``val_direction``; needs ``aggregation="per_sample"``)."""
    shared: str = "keep"
    """``keep`` (paper) or ``remove`` (our option): the validation gradients' top principal direction, the
    one all inputs share, is projected out of the validation direction (``val_direction``)."""
    score: str = "dot"
    """``dot`` u_i = Σ_l (ā_i·ā_v)(ĝ_i·ĝ_v) (paper) or ``cosine``: u_i / ‖∇ℓ_i‖ (our option, not in the
    paper or its code: the direction of a sample's gradient, not its size, decides its weight), or
    ``layer_cosine``: u_i = Σ_l Σ_v β_v cos(∇_l ℓ_i, ∇_l ℓ_v), every site (bottleneck, dense layer, or
    ``exact``'s adapted layer) votes with the same weight (our option; ``similarity.unit_stats``; needs
    ``aggregation="per_sample"``)."""

    def __post_init__(self) -> None:
        per_sample = self.aggregation == "per_sample"
        _check(
            "reweight.direction",
            [
                ("aggregation", self.aggregation in sim.VAL_AGGREGATIONS, f"one of {sim.VAL_AGGREGATIONS}"),
                (
                    "balance",
                    self.balance in val_direction.VAL_BALANCES,
                    f"one of {val_direction.VAL_BALANCES}",
                ),
                (
                    "shared",
                    self.shared in val_direction.SHARED_DIRECTIONS,
                    f"one of {val_direction.SHARED_DIRECTIONS}",
                ),
                (
                    "aggregation",
                    per_sample or val_direction.is_default(self.balance, self.shared),
                    "'per_sample' with balance or shared (they weight single validation samples)",
                ),
                ("score", self.score in SCORES, f"one of {SCORES}"),
                (
                    "aggregation",
                    per_sample or self.score != "layer_cosine",
                    "'per_sample' with score='layer_cosine' (it compares single validation samples)",
                ),
            ],
            self,
        )


@dataclass
class WeightsConfig:
    """``reweight.weights``: how the scores u become weights w = max(u,0)/(Σ max(u,0) + δ)."""

    negative: str = "clip"
    """``clip`` max(u, 0) (paper) or ``shift`` u − 2·min(u) when min(u) < 0 (published code)."""
    fallback: str = "skip"
    """Signal, all against (Σ max(u,0) ≤ δ with u ≢ 0: every u ≤ 0, some < 0): ``skip`` (the paper's Eq. 8:
    w = 0 and the batch's optimizer step is skipped, so θ and the AdamW state do not move), ``uniform``
    (our option: w = 1/B over samples with a loss) or ``zero`` (w = 0 and the AdamW step is taken: its
    momentum still moves θ; the former option, kept for comparison). Recorded in ``weights.jsonl``."""
    no_signal: str = "unweighted"
    """No signal (u ≡ 0 because g ≡ 0, as at the first step where B = 0): ``unweighted`` (one plain step
    with w = 1/B, as the published code does at step 0; recorded) or ``fallback`` (as ``fallback`` says:
    Eq. 8 read literally, under which a low-rank score never moves B from 0)."""
    delta: float = 1e-30
    """δ of w = max(u,0)/(Σ max(u,0) + δ). The paper's δ(a) is 1 at a = 0 and 0 elsewhere (it only guards
    0/0); here Σ ≤ δ counts as a zero sum. u's scale changes by orders of magnitude (B starts at 0), so a
    larger absolute δ would silently shrink the step."""

    def __post_init__(self) -> None:
        _check(
            "reweight.weights",
            [
                ("negative", self.negative in sim.NEGATIVES, f"one of {sim.NEGATIVES}"),
                ("fallback", self.fallback in sim.FALLBACKS, f"one of {sim.FALLBACKS}"),
                ("no_signal", self.no_signal in sim.NO_SIGNAL, f"one of {sim.NO_SIGNAL}"),
                ("delta", isinstance(self.delta, int | float) and self.delta >= 0, "a non-negative number"),
            ],
            self,
        )


@dataclass
class PublishedCodeConfig:
    """``reweight.published_code``: the published code's step-level choices (all off by default)."""

    unweighted_first_step: bool = False
    """Published code: step 0 is a plain, unweighted step."""
    val_step_every: int = 0
    """Published code (10): every N steps also take an AdamW step on the validation loss (0: never)."""
    val_refresh_every: int = 1
    """Recompute the validation statistics every N steps (published code: 10); reused in between."""

    def __post_init__(self) -> None:
        _check(
            "reweight.published_code",
            [
                ("val_step_every", self.val_step_every >= 0, "a non-negative integer"),
                ("val_refresh_every", self.val_refresh_every > 0, "a positive integer"),
            ],
            self,
        )


SECTIONS: dict[str, type] = {
    "stats": StatsConfig,
    "direction": DirectionConfig,
    "weights": WeightsConfig,
    "published_code": PublishedCodeConfig,
}

ALIASES: dict[str, tuple[str, str]] = {
    "similarity": ("stats", "similarity"),
    "modules": ("stats", "modules"),
    "positions": ("stats", "positions"),
    "val_aggregation": ("direction", "aggregation"),
    "val_balance": ("direction", "balance"),
    "shared_direction": ("direction", "shared"),
    "score": ("direction", "score"),
    "negative": ("weights", "negative"),
    "fallback": ("weights", "fallback"),
    "delta": ("weights", "delta"),
    "unweighted_first_step": ("published_code", "unweighted_first_step"),
    "val_step_every": ("published_code", "val_step_every"),
    "val_refresh_every": ("published_code", "val_refresh_every"),
}
"""Old flat key → (section, key): accepted by ``from_dict`` with a ``FutureWarning``."""


@dataclass
class ReweightConfig:
    """The ``reweight:`` section of a run config (nested; build from YAML with ``from_dict``)."""

    batch_size: int = 8
    """Global training samples per step (over all ranks)."""
    val_ratio: int = 10
    """Training pool : validation set (the paper's 5:1, 10:1, 50:1, §4.4 and Fig. 3): the run draws a
    validation set of M = N // val_ratio examples (N: the training pool) from ``data.val_split`` of
    ``data.val_task`` with ``seed`` (``reweight_data``). A *dataset* ratio, not a per-step one."""
    val_batch_size: int | None = None
    """Validation samples per step, drawn in seeded epochs from the validation set (None: ``batch_size``,
    as in the published code; never more than the set holds)."""
    scheme: str = "auto"
    """``fused`` (one backward; plain PEFT LoRA only), ``two_backward`` (any adapter), ``auto``: fused when possible."""
    group_by_length: bool = False
    """Training batches of similar lengths (``multitask.group_by_length``'s mega-batch grouping): less padding,
    every sample still once per epoch; other batch compositions, so off by default. Validation batches are
    drawn as before."""
    seed: int = 0
    """Seed of the validation-set draw and of the training and validation batch order."""
    log_weights: bool = True
    """Write ``weights.jsonl``, ``sample_weights.jsonl`` and ``weights_hist.png`` in the run directory."""
    stats: StatsConfig = field(default_factory=StatsConfig)
    """What is captured per sample (``StatsConfig``)."""
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    """What a sample is scored against, and how (``DirectionConfig``)."""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    """How scores become weights (``WeightsConfig``)."""
    published_code: PublishedCodeConfig = field(default_factory=PublishedCodeConfig)
    """The published code's step-level choices (``PublishedCodeConfig``)."""

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ReweightConfigError(
                    f"reweight.{name}: expected a {cls.__name__} (use ReweightConfig.from_dict for mappings)"
                )
        _check(
            "reweight",
            [
                (
                    "batch_size",
                    isinstance(self.batch_size, int) and self.batch_size > 0,
                    "a positive integer",
                ),
                (
                    "val_ratio",
                    isinstance(self.val_ratio, int) and self.val_ratio > 0,
                    f"a positive integer ({VAL_RATIOS_DOC})",
                ),
                (
                    "val_batch_size",
                    self.val_batch_size is None or self.val_batch_size > 0,
                    "null or positive",
                ),
                ("scheme", self.scheme in SCHEMES, f"one of {SCHEMES}"),
            ],
            self,
        )

    @property
    def effective_val_batch_size(self) -> int:
        """|V| per step: ``val_batch_size``, by default the training batch (before capping at the set size)."""
        return self.val_batch_size or self.batch_size

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> ReweightConfig:
        """The config from a YAML section: nested keys, or the old flat keys (``ALIASES``, with a
        ``FutureWarning``; where both name one setting, the later in the mapping wins). Unknown keys raise;
        strings in float fields (YAML 1.1 reads ``1e-4`` as one) become floats."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in mapping.items():
            if key in SECTIONS:
                _collect_section(key, value, nested[key])
            elif key in ALIASES:
                section, new = ALIASES[key]
                warnings.warn(f"reweight.{key} is now reweight.{section}.{new}", FutureWarning, stacklevel=2)
                nested[section][new] = value  # a later key naming the same setting wins
            elif key in _field_types(cls):
                top[key] = value
            else:
                raise ReweightConfigError(
                    f"reweight.{_shown(key)}: unknown key; known: {sorted(_field_types(cls))} "
                    f"(and the old flat keys {sorted(ALIASES)})"
                )
        sections = {
            name: SECTIONS[name](**_coerce(SECTIONS[name], vals, f"reweight.{name}"))
            for name, vals in nested.items()
        }
        return cls(**_coerce(cls, top, "reweight"), **sections)

    def to_dict(self) -> dict[str, Any]:
        """The nested form (``from_dict(to_dict())`` gives an equal config)."""
        return dataclasses.asdict(self)


def _collect_section(section: str, values: Any, into: dict[str, Any]) -> None:
    if not isinstance(values, Mapping):
        raise ReweightConfigError(
            f"reweight.{section}: expected a mapping of {sorted(_field_types(SECTIONS[section]))}"
        )
    known = _field_types(SECTIONS[section])
    for key, value in values.items():
        if key not in known:
            raise ReweightConfigError(
                f"reweight.{section}.{_shown(key)}: unknown key; known: {sorted(known)}"
            )
        into[key] = value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Every value checked against its field's annotation (``metalora.train.typed``): strings in float
    fields become floats, a list where a number belongs is refused naming the key."""
    try:
        return coerce_fields(cls, values, f"{where}.")
    except FieldTypeError as exc:
        raise ReweightConfigError(str(exc)) from None


def _shown(key: Any) -> str:
    """A key as written in an error: plain names as they are, anything else quoted (one line always)."""
    return key if isinstance(key, str) and key.isidentifier() else repr(key)
