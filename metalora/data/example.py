"""The two data types every other part of metalora sees: `Example` and `Task`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metalora.data.errors import MetaloraDataError

SPLITS = ("train", "dev", "test")


@dataclass
class Example:
    """One sample of a task.

    Attributes:
        prompt: the text the model conditions on (no loss on it).
        response: the text the model learns to produce (the loss falls only here).
        task: the name of the task this example belongs to.
        id: an identifier unique within the task and stable across seeds (e.g. ``"arc_easy/val/17"``).
        options: for multiple choice, the option texts in the order they are lettered (A, B, ...).
        answer: for multiple choice, the index of the gold option in ``options``.
        meta: free extra data (e.g. the short gold answer of GSM8K under ``"target"``).
    """

    prompt: str
    response: str
    task: str
    id: str
    options: list[str] | None = None
    answer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer is not None:
            if self.options is None:
                raise MetaloraDataError(
                    f"example {self.id!r} of task {self.task!r} has an answer but no options"
                )
            if not 0 <= self.answer < len(self.options):
                raise MetaloraDataError(
                    f"example {self.id!r} of task {self.task!r}: answer index {self.answer} is out of range "
                    f"for {len(self.options)} options"
                )


@dataclass
class Task:
    """A named task with deterministic train/dev/test splits.

    Attributes:
        name: the task name (unique within a run).
        train, dev, test: lists of `Example`.
        meta: at least ``source`` (where the data came from), ``license``, ``seed`` (the split seed),
            ``kind`` (``"mc"`` or ``"gen"``); built-ins also record ``eval_only`` and the split sizes.
    """

    name: str
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.train or self.dev or self.test):
            raise MetaloraDataError(f"task {self.name!r} is empty: it has no examples in any split")

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (``"train"``, ``"dev"`` or ``"test"``)."""
        if name not in SPLITS:
            raise MetaloraDataError(f"unknown split {name!r}; the splits are {list(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """``{"train": n, "dev": n, "test": n}``."""
        return {s: len(getattr(self, s)) for s in SPLITS}
