"""A run's ``select:`` section: the data-selection baselines (BM25, DSIR, a binary classifier, MIX) as a
training recipe, so that ``metalora compare`` runs them beside reweighting on the same pool, validation set
and step budget.

    algorithm: lora_mt
    data: {tasks: [medmcqa], examples_per_task: 800, val_task: medqa, val_split: dev}
    select: {method: bm25, val_ratio: 10, fraction: 0.25, seed: 0}

The pool is the run's training examples (N of them, over every task of ``data.tasks``). The target set is
the reweighting validation set: M = N // ``val_ratio`` examples of ``data.val_split`` of ``data.val_task``
(``data.val_examples`` sets M directly), drawn by ``reweight_data.draw_validation_set`` with
``select.seed``; so a selection run and a reweighting run with the same seed and ratio use the same M
examples, none of them a test item. Then

* ``bm25`` / ``dsir`` / ``classifier``: keep k = ``k`` or round(``fraction`` · N) of the pool (BM25 and the
  classifier: the top k; DSIR: a Gumbel top-k ∝ its importance weight, seeded), and train on those;
* ``mix``: train on the pool and the target set mixed at ``mix_ratio`` pool examples per target example
  (``select.mix``; with the default 10 and M = N/10, all of both: the paper's "MIX 10:1").

The choice is recorded in the run's ``data.json`` (``selection``: method, sizes, score statistics, the chosen
ids). Only ``algorithm: lora_mt`` takes a ``select:`` section (a selected pool is one mixed pool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from metalora.data.example import Example
from metalora.select import METHODS, select_examples

__all__ = ["SelectConfig", "SelectConfigError", "select_pool"]

SelectMethod = Literal["bm25", "dsir", "classifier", "mix"]


class SelectConfigError(ValueError):
    """A ``select:`` section that cannot be used."""


@dataclass
class SelectConfig:
    """The ``select:`` section (see the module docstring)."""

    method: SelectMethod = "bm25"
    val_ratio: int = 10
    """M = N // val_ratio target (validation) examples for a pool of N (``data.val_examples`` overrides)."""
    fraction: float = 0.25
    """BM25 / DSIR / classifier: the share of the pool kept, when ``k`` is not given."""
    k: int | None = None
    """BM25 / DSIR / classifier: the number of pool examples kept (overrides ``fraction``); MIX: the mix's
    size (None: every pool example that fits the ratio)."""
    mix_ratio: float = 10.0
    """MIX: pool examples per target example (the paper's 10:1)."""
    seed: int = 0
    """The target set's draw, DSIR's Gumbel top-k, the classifier's split, MIX's draw."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's own options (``metalora.select.METHODS``: e.g. ``{aggregate: max}`` for BM25)."""

    def __post_init__(self) -> None:
        if self.val_ratio <= 0:
            raise SelectConfigError(f"select.val_ratio={self.val_ratio!r}: expected a positive integer")
        if not 0 < self.fraction <= 1:
            raise SelectConfigError(f"select.fraction={self.fraction!r}: expected 0 < fraction <= 1")
        if self.k is not None and self.k <= 0:
            raise SelectConfigError(f"select.k={self.k!r}: expected a positive integer or null")
        if self.mix_ratio < 0:
            raise SelectConfigError(f"select.mix_ratio={self.mix_ratio!r}: expected >= 0")
        unknown = sorted(set(self.options) - set(METHODS[self.method]))
        if unknown:
            raise SelectConfigError(
                f"select.options: {self.method} takes no option(s) {unknown}; it accepts "
                f"{list(METHODS[self.method])}"
            )
        if self.options.get("sampling") == "pareto":
            raise SelectConfigError(
                "select.options.sampling=pareto keeps a random number of rows; a recipe keeps k "
                "(select.k or select.fraction): use sampling=top_k"
            )

    def kept(self, n_pool: int) -> int | None:
        """How many examples the method keeps from a pool of ``n_pool`` (MIX: ``k`` or None)."""
        if self.method == "mix":
            return self.k
        k = self.k if self.k is not None else max(1, round(self.fraction * n_pool))
        if k > n_pool:
            raise SelectConfigError(f"select.k={k} is more than the {n_pool} examples of the training pool")
        return k


def select_pool(
    select: SelectConfig, pool: Mapping[str, Sequence[Example]], target: Sequence[Example]
) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """The selected training examples by task (pool tasks first, then MIX's target task) and the summary
    recorded in ``data.json``."""
    candidates = [e for examples in pool.values() for e in examples]
    chosen, summary = select_examples(
        select.method,
        candidates,
        target,
        k=select.kept(len(candidates)),
        ratio=select.mix_ratio if select.method == "mix" else None,
        seed=select.seed,
        **select.options,
    )
    by_task: dict[str, list[Example]] = {name: [] for name in pool}
    for example in chosen:
        by_task.setdefault(example.task, []).append(example)
    return {name: examples for name, examples in by_task.items() if examples}, summary
