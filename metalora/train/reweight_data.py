"""The reweighting validation set: M = N / ratio examples drawn once per run, disjoint from the test items.

The paper's "10:1 ratio of training samples to validation samples" (§4.4, Fig. 3; the MIX baseline's
ratio too) is a *dataset* ratio: a small clean validation set of M = N/10 examples beside a training
pool of N. So ``reweight.val_ratio`` sets

    M = max(1, N // val_ratio)          (``data.val_examples``, when set, gives M directly)

drawn from ``data.val_split`` of ``data.val_task`` with ``reweight.seed``: the first M of one seeded
permutation of the eligible candidates, so with one seed the 50:1 set is inside the 10:1 set, which is
inside the 5:1 set. Candidates are eligible unless they are test items: ``val_split="test"`` is refused,
and any candidate whose (task, id) is a test item's is left out. (Identity, not content: two items of
a source with the same text and different ids are not detected.) Each step then scores against a
validation *batch* of ``reweight.val_batch_size`` drawn from the set (default: the training batch, as
in the published code).

An earlier reading took the ratio per step (|V| = batch_size // ratio: one validation sample per step
at batch 8, and the 5:1, 10:1 and 50:1 settings the same run at batch 4 or 8); that was a misreading.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np

from metalora.data import Example
from metalora.train.reweight_config import ReweightConfigError

VALIDATION_STREAM = 0x56414C
"""Second word of the draw's seed, so the draw is not the batch order of ``EpochBatches(seed)``."""


def validation_set_size(n_train: int, ratio: int, size: int | None = None) -> int:
    """M = max(1, N // ratio) for a training pool of N (``size``, when given, is M itself)."""
    if size is not None:
        if size <= 0:
            raise ReweightConfigError(f"data.val_examples={size!r}: expected a positive integer or null")
        return size
    if ratio <= 0:
        raise ReweightConfigError(f"reweight.val_ratio={ratio!r}: expected a positive integer")
    return max(1, n_train // ratio)


def held_out_keys(examples: Iterable[Example]) -> set[tuple[str, str]]:
    """The (task, id) of every test item: what a validation set must not contain."""
    return {(e.task, e.id) for e in examples}


def draw_validation_set(
    candidates: Sequence[Example],
    n_train: int,
    ratio: int,
    seed: int,
    exclude: Collection[tuple[str, str]] = (),
    size: int | None = None,
    ratio_key: str = "reweight.val_ratio",
) -> list[Example]:
    """M = ``validation_set_size(n_train, ratio, size)`` of ``candidates`` not in ``exclude`` ((task, id)
    keys of the test items), the first M of a permutation seeded by ``seed``; raises when fewer remain
    (naming ``ratio_key``, the recipe key of ``ratio``)."""
    m = validation_set_size(n_train, ratio, size)
    excluded = set(exclude)
    eligible = [e for e in candidates if (e.task, e.id) not in excluded]
    if len(eligible) < m:
        how = f"data.val_examples={size}" if size is not None else f"N // val_ratio = {n_train} // {ratio}"
        raise ReweightConfigError(
            f"the validation set needs M = {m} examples ({how}) but the validation source has "
            f"{len(eligible)} outside the test items; raise {ratio_key}, set data.val_examples, or "
            "choose a larger data.val_split"
        )
    order = np.random.default_rng([int(seed), VALIDATION_STREAM]).permutation(len(eligible))
    return [eligible[i] for i in order[:m]]
