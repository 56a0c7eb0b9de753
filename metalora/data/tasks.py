"""`TaskSpec` (the typed config of one task) and `load_task` / `load_tasks`, which read a source,
map its fields, and cut deterministic train/dev/test splits from a seed.

Split rule: the examples of a source with one split are permuted with
``numpy.random.default_rng([seed, crc32(task name)])``; the first ``round(n * dev)`` go to dev, the next
``round(n * test)`` to test, the rest to train (round half up). Sources with native splits (MMLU;
a user ``path`` given as ``{"train": ..., "dev": ..., "test": ...}``) keep them when
``native_splits=True``. The seed is recorded in ``Task.meta["seed"]``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from metalora.data.builtin import resolve_builtin
from metalora.data.errors import MetaloraDataError
from metalora.data.example import SPLITS, Example, Task
from metalora.data.sources import FILE_FORMATS, read_records
from metalora.data.templates import MC_RESPONSES, SCHEMAS, record_to_example

# how the native splits of built-ins map onto train/dev/test when native_splits=True
NATIVE_SPLIT_MAP = {"validation": "train", "dev": "dev", "test": "test"}


MAX_TASK_NAME_BYTES = 200  # a directory name: file systems allow 255 bytes


def check_task_name(name: Any) -> None:
    """A task name names a directory of a LoRA-ST run (``tasks/<name>/``) and a metrics key, so it must
    be a plain name: non-empty, no path separator, not starting with a dot (which also refuses ``..``), no
    control character (a NUL is not allowed in a path), at most 200 bytes of UTF-8."""
    plain = isinstance(name, str) and name and "/" not in name and "\\" not in name and name[0] != "."
    if not plain or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise MetaloraDataError(
            f"task name {name!r}: expected a plain name (letters, digits, '_', '-', ':' ...) with no path "
            "separator, no control character and no leading '.'"
        )
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TASK_NAME_BYTES:
        raise MetaloraDataError(
            f"task name {name[:40]!r}...: {len(name.encode('utf-8', 'surrogatepass'))} bytes of UTF-8, at most "
            f"{MAX_TASK_NAME_BYTES} (it names a directory)"
        )


@dataclass
class TaskSpec:
    """The config of one task. Exactly one of ``builtin`` / ``path``; if neither is set, ``name`` is
    taken as a built-in name."""

    name: str
    """Task name, unique within a run (also the key of the task-id map)."""
    builtin: str | None = None
    """A built-in name: ``"arc_easy"``, ``"mmlu"``, ``"mmlu:anatomy"``, ``"bbh:date_understanding"``..."""
    path: str | dict[str, str] | None = None
    """A file/directory, or ``{"train": p, "dev": p, "test": p}`` (any subset) for pre-split data."""
    file_format: str | None = None
    """``jsonl``, ``json``, ``csv``, ``parquet`` or ``hf``; inferred from the extension when unset."""
    hf_split: str | None = None
    """For ``hf`` sources: the split to read from a ``DatasetDict``."""
    hf_name: str | None = None
    """For ``hf`` sources read with ``load_dataset``: the config name."""
    schema: str = "columns"
    """Field mapping: ``"columns"`` (named fields/templates), ``"alpaca"``, or ``"messages"`` (chat)."""
    prompt_field: str = "prompt"
    """Column holding the prompt (``columns`` schema, when no ``prompt_template``)."""
    response_field: str | None = "response"
    """Column holding the response (``columns`` schema, when no ``response_template``)."""
    options_field: str | list[str] | None = None
    """Column holding a list of options, or a list of columns (one per option): multiple choice."""
    answer_field: str | None = None
    """Column holding the gold option: an index, a letter, or the option text."""
    id_field: str | None = None
    """Column holding a per-row id; the row number otherwise."""
    messages_field: str = "messages"
    """Column holding the chat list (``messages`` schema)."""
    prompt_template: str | None = None
    """``str.format`` template over the record's fields, e.g. ``"Q: {question}\\nA:"``."""
    response_template: str | None = None
    """``str.format`` template for the response, e.g. ``" {answer}"``."""
    mc_response: str = "letter_text"
    """How multiple choice is rendered as SFT: ``letter_text`` (`` B. text``), ``letter``, or ``text``."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions (train, dev, test) for sources with a single split."""
    native_splits: bool = True
    """Keep a source's own splits where it has them (MMLU: validation->train, dev->dev, test->test)."""
    license: str | None = None
    """License of a user source, recorded in ``Task.meta``."""
    train_from_test: int = 0
    """Move this many test items to train, the same ones whatever the run's seed (a permutation seeded by the
    task name alone): labelled examples of an evaluation-only task (BBH) to fit on, e.g. LoRAHub's 5, which
    are then never scored. Every run given the same spec scores the same remaining test items."""

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if self.builtin is not None and self.path is not None:
            raise MetaloraDataError(f"task {self.name!r}: set either builtin or path, not both")
        if self.builtin is None and self.path is None:
            self.builtin = self.name
        if self.schema not in SCHEMAS:
            raise MetaloraDataError(
                f"task {self.name!r}: unknown schema {self.schema!r}; choose one of {list(SCHEMAS)}"
            )
        if self.mc_response not in MC_RESPONSES:
            raise MetaloraDataError(
                f"task {self.name!r}: unknown mc_response {self.mc_response!r}; choose one of {list(MC_RESPONSES)}"
            )
        if not (isinstance(self.train_from_test, int) and self.train_from_test >= 0):
            raise MetaloraDataError(
                f"task {self.name!r}: train_from_test={self.train_from_test!r}: expected a non-negative integer"
            )
        if self.file_format is not None and self.file_format not in FILE_FORMATS:
            raise MetaloraDataError(
                f"task {self.name!r}: unknown file_format {self.file_format!r}; choose one of {list(FILE_FORMATS)}"
            )
        if isinstance(self.path, Mapping):
            bad = sorted(set(self.path) - set(SPLITS))
            if bad or not self.path:
                raise MetaloraDataError(
                    f"task {self.name!r}: path keys must be among {list(SPLITS)}, got {sorted(self.path)}"
                )
        split = tuple(float(x) for x in self.split)
        if len(split) != 3 or any(x < 0 for x in split) or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
            raise MetaloraDataError(
                f"task {self.name!r}: split must be three non-negative fractions (train, dev, test) summing to 1, "
                f"got {self.split}"
            )
        self.split = split  # type: ignore[assignment]
        if (self.options_field is None) != (self.answer_field is None):
            raise MetaloraDataError(f"task {self.name!r}: set options_field and answer_field together")

    @classmethod
    def coerce(cls, spec: TaskSpec | Mapping[str, Any] | str) -> TaskSpec:
        """A `TaskSpec` from a spec, a config mapping (``from_dict``) or a built-in name."""
        if isinstance(spec, str):
            return cls(name=spec)
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        return spec

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        """Build from a config mapping; an unknown key raises listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise MetaloraDataError(f"unknown task config keys {unknown}; valid keys: {valid}")
        if "name" not in d:
            raise MetaloraDataError(f"task config {dict(d)!r} has no 'name'")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for saving the resolved config)."""
        return asdict(self)


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, dev, test) sizes: dev and test are ``floor(n * f + 0.5)``, train takes the rest."""
    n_dev = math.floor(n * fractions[1] + 0.5)
    n_test = min(n - n_dev, math.floor(n * fractions[2] + 0.5))
    return n - n_dev - n_test, n_dev, n_test


def split_examples(
    examples: Sequence[Example], seed: int, task: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic (train, dev, test) split of ``examples`` (see the module docstring)."""
    n = len(examples)
    perm = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(n)
    n_train, n_dev, n_test = split_sizes(n, fractions)
    dev = [examples[i] for i in perm[:n_dev]]
    test = [examples[i] for i in perm[n_dev : n_dev + n_test]]
    train = [examples[i] for i in perm[n_dev + n_test :]]
    return train, dev, test


HOLDOUT_STREAM = 0x484F4C44
"""Second word of ``_train_from_test``'s seed, so its draw is not ``split_examples``' permutation."""


def _train_from_test(
    spec: TaskSpec, train: list[Example], test: list[Example]
) -> tuple[list[Example], list[Example]]:
    """``spec.train_from_test`` test items (a permutation seeded by the task name only) appended to train;
    the rest of test in its order."""
    k = spec.train_from_test
    if k >= len(test):
        raise MetaloraDataError(
            f"task {spec.name!r}: train_from_test={k} would leave no test item (its test split has {len(test)})"
        )
    order = np.random.default_rng([zlib.crc32(spec.name.encode()), HOLDOUT_STREAM]).permutation(len(test))
    moved = set(order[:k].tolist())
    return train + [test[i] for i in sorted(moved)], [ex for i, ex in enumerate(test) if i not in moved]


def _rename(examples: list[Example], name: str) -> list[Example]:
    for ex in examples:
        ex.task = name
    return examples


def _load_file_examples(spec: TaskSpec, path: str, split_tag: str) -> list[Example]:
    records = read_records(path, spec.file_format, hf_split=spec.hf_split, hf_name=spec.hf_name)
    out = []
    for i, rec in enumerate(records):
        where = f"{path} (task {spec.name!r}, record {i + 1})"
        rid = str(rec[spec.id_field]) if spec.id_field and spec.id_field in rec else str(i)
        if spec.id_field and spec.id_field not in rec:
            raise MetaloraDataError(
                f"{where}: missing field {spec.id_field!r}; available fields: {sorted(rec)}"
            )
        out.append(
            record_to_example(
                rec,
                task=spec.name,
                id=f"{spec.name}/{split_tag}/{rid}",
                where=where,
                schema=spec.schema,
                prompt_field=spec.prompt_field,
                response_field=spec.response_field,
                options_field=spec.options_field,
                answer_field=spec.answer_field,
                messages_field=spec.messages_field,
                prompt_template=spec.prompt_template,
                response_template=spec.response_template,
                mc_response=spec.mc_response,
            )
        )
    if not out:
        raise MetaloraDataError(f"task {spec.name!r}: {path} holds no records (empty task)")
    _check_unique_ids(out, path, spec.name)
    return out


def _check_unique_ids(examples: list[Example], path: str, task: str) -> None:
    """Ids key few-shot exclusion, predictions and sample weights, so two records may not share one."""
    first: dict[str, int] = {}
    for i, ex in enumerate(examples, start=1):
        j = first.setdefault(ex.id, i)
        if j != i:
            raise MetaloraDataError(
                f"{path} (task {task!r}): records {j} and {i} have the same id {ex.id!r}; ids must be unique"
            )


def load_task(spec: TaskSpec | Mapping[str, Any] | str, seed: int = 0) -> Task:
    """Load one task: a `TaskSpec`, a config dict, or a built-in name; splits are cut with ``seed``."""
    spec = TaskSpec.coerce(spec)
    meta: dict[str, Any] = {"seed": int(seed), "eval_only": False}
    native: dict[str, list[Example]]
    if spec.builtin is not None:
        info = resolve_builtin(spec.builtin)
        loaded = info.loader(spec.name, spec.mc_response)
        if isinstance(loaded, tuple):  # (splits, evaluation settings), e.g. BBH's lm-eval 3-shot protocol
            loaded, meta["eval"] = loaded
        native = {k: _rename(v, spec.name) for k, v in loaded.items()}
        meta.update(
            source=f"builtin:{spec.builtin} ({info.source})", license=info.license, eval_only=info.eval_only
        )
    else:
        paths = spec.path if isinstance(spec.path, Mapping) else {"all": spec.path}
        native = {k: _load_file_examples(spec, str(p), k) for k, p in paths.items()}
        meta.update(
            source=", ".join(f"{k}: {Path(str(p))}" for k, p in paths.items()),
            license=spec.license or "unknown",
        )

    if meta["eval_only"]:
        dev = native.pop("fewshot", [])
        train, test = [], [ex for exs in native.values() for ex in exs]
        meta["split_rule"] = "eval only: every example in test" + (
            ", the few-shot exemplars in dev" if dev else ""
        )
    elif spec.native_splits and (len(native) > 1 or isinstance(spec.path, Mapping)):
        mapped = {NATIVE_SPLIT_MAP.get(k, k): v for k, v in native.items()}
        train, dev, test = (mapped.get(s, []) for s in SPLITS)
        meta["split_rule"] = "native splits " + ", ".join(
            f"{k}->{NATIVE_SPLIT_MAP.get(k, k)}" for k in native
        )
    else:
        pooled = [ex for exs in native.values() for ex in exs]
        train, dev, test = split_examples(pooled, seed, spec.name, spec.split)
        meta["split_rule"] = f"seeded split, fractions (train, dev, test) = {spec.split}"
    if spec.train_from_test:
        train, test = _train_from_test(spec, list(train), list(test))
        meta["split_rule"] += f"; {spec.train_from_test} test items moved to train (seeded by the task name)"
    all_examples = train + dev + test
    if not all_examples:
        raise MetaloraDataError(f"task {spec.name!r} is empty: its source has no examples")
    meta["kind"] = "mc" if all(ex.options is not None for ex in all_examples) else "gen"
    meta["sizes"] = {"train": len(train), "dev": len(dev), "test": len(test)}
    meta["spec"] = spec.to_dict()
    return Task(spec.name, list(train), list(dev), list(test), meta)


def load_tasks(specs: Iterable[TaskSpec | Mapping[str, Any] | str], seed: int = 0) -> list[Task]:
    """Load several tasks; duplicate names raise before anything is read."""
    resolved = [TaskSpec.coerce(s) for s in specs]
    names = [s.name for s in resolved]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MetaloraDataError(f"duplicate task names {dupes}; give each task a unique name")
    if not resolved:
        raise MetaloraDataError("no tasks given")
    return [load_task(s, seed=seed) for s in resolved]


def task_id_map(tasks: Sequence[Task | str]) -> dict[str, int]:
    """``{task name: id}`` in the given order; duplicates raise."""
    names = [t if isinstance(t, str) else t.name for t in tasks]
    if len(set(names)) != len(names):
        raise MetaloraDataError(f"duplicate task names {sorted({n for n in names if names.count(n) > 1})}")
    return {n: i for i, n in enumerate(names)}
