"""MIX: the training data combined with the validation (target) data at a fixed ratio.

With ``ratio`` = r (training rows per validation row, train:val = r:1) and no size ``k``, the largest mix
that fits is taken: n_val = min(|val|, ⌊|train| / r⌋) validation rows and n_train = round(r·n_val)
training rows. With ``k``: n_val = round(k / (1 + r)) and n_train = k − n_val (an error if either set is
too small). Without a ratio, every training and validation row is used. Rows are drawn without
replacement with ``numpy.random.default_rng(seed)`` and the result is shuffled with the same generator;
each output row records where it came from in ``"selection_source"`` (``"candidates"`` or ``"target"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mix_counts", "mix_rows"]


def mix_counts(n_train: int, n_val: int, ratio: float | None, k: int | None = None) -> tuple[int, int]:
    """(training rows, validation rows) of the mix; see the module docstring."""
    if ratio is None:
        if k is not None:
            raise ValueError("MIX with k also needs a ratio (training rows per validation row)")
        return n_train, n_val
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0 (training rows per validation row), got {ratio}")
    if k is None:
        take_val = n_val if ratio == 0 else min(n_val, int(n_train // ratio))
        take_train = round(ratio * take_val)
    else:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        take_val = round(k / (1 + ratio))
        take_train = k - take_val
    if take_val > n_val or take_train > n_train:
        raise ValueError(
            f"MIX at ratio {ratio}:1 (k={k}) needs {take_train} training and {take_val} validation rows; "
            f"there are {n_train} and {n_val}"
        )
    if take_val == 0 and take_train == 0:
        raise ValueError(
            f"MIX at ratio {ratio}:1 with {n_train} training and {n_val} validation rows is empty"
        )
    return take_train, take_val


def mix_rows(
    train: Sequence[dict[str, Any]],
    val: Sequence[dict[str, Any]],
    ratio: float | None = None,
    k: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The shuffled mix of sampled training and validation rows, each tagged with ``selection_source``."""
    take_train, take_val = mix_counts(len(train), len(val), ratio, k)
    rng = np.random.default_rng(seed)
    train_idx = rng.choice(len(train), size=take_train, replace=False)
    val_idx = rng.choice(len(val), size=take_val, replace=False)
    rows = [{**train[i], "selection_source": "candidates"} for i in train_idx]
    rows += [{**val[i], "selection_source": "target"} for i in val_idx]
    return [rows[i] for i in rng.permutation(len(rows))]
