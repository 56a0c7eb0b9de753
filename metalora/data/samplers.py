"""Samplers: per-task few-shot pools, task mixtures, and the episodic support/query sampler of MeTA-LoRA.

All randomness comes from ``numpy.random.Generator(PCG64)`` objects seeded from the caller's seed; their
state is plain JSON-able data (``bit_generator.state``), so ``state_dict()`` / ``load_state_dict()``
resume the identical stream without pickle.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metalora.data.errors import MetaloraDataError
from metalora.data.example import Example, Task

MIXTURES = ("proportional", "uniform", "temperature")


def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), *(zlib.crc32(s.encode()) for s in salt)])


def few_shot_pool(examples: Sequence[Example], k: int, seed: int, task: str = "") -> list[Example]:
    """``k`` examples drawn without replacement from ``examples`` with ``seed`` (and the task name as salt,
    so two tasks with the same seed do not pick the same positions). ``k`` larger than the data raises."""
    if k <= 0:
        raise MetaloraDataError(f"few-shot pool size must be positive, got k={k}")
    if k > len(examples):
        raise MetaloraDataError(
            f"task {task!r}: cannot draw a few-shot pool of k={k} from {len(examples)} examples"
        )
    idx = _rng(seed, "pool", task).choice(len(examples), size=k, replace=False)
    return [examples[i] for i in sorted(idx.tolist())]


def build_pools(
    tasks: Sequence[Task], k: int | Mapping[str, int], seed: int, split: str = "train"
) -> dict[str, list[Example]]:
    """``{task name: few-shot pool}`` from each task's ``split``; ``k`` is one size or a per-task mapping."""
    pools = {}
    for t in tasks:
        if t.name in pools:
            raise MetaloraDataError(f"duplicate task name {t.name!r}")
        size = k[t.name] if isinstance(k, Mapping) else k
        pools[t.name] = few_shot_pool(t.split(split), size, seed, t.name)
    return pools


def mixture_weights(
    sizes: Mapping[str, int], strategy: str = "proportional", temperature: float = 1.0
) -> dict[str, float]:
    """Task sampling probabilities: ``proportional`` (p ∝ n), ``uniform`` (p = 1/T), or ``temperature``
    (p ∝ n^(1/temperature); temperature 1 is proportional, → ∞ tends to uniform)."""
    if not sizes:
        raise MetaloraDataError("mixture of no tasks")
    empty = [n for n, s in sizes.items() if s <= 0]
    if empty:
        raise MetaloraDataError(f"empty tasks in mixture: {empty}")
    if strategy == "uniform":
        raw = {n: 1.0 for n in sizes}
    elif strategy == "proportional":
        raw = {n: float(s) for n, s in sizes.items()}
    elif strategy == "temperature":
        if not temperature > 0:
            raise MetaloraDataError(f"temperature must be > 0, got {temperature}")
        raw = {n: math.pow(s, 1.0 / temperature) for n, s in sizes.items()}
    else:
        raise MetaloraDataError(f"unknown mixture strategy {strategy!r}; choose one of {list(MIXTURES)}")
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}


def _check_state(state: Mapping[str, Any], config: dict[str, Any], kind: str) -> None:
    if state.get("config") != config:
        raise MetaloraDataError(
            f"{kind} state was saved with config {state.get('config')}, this sampler has {config}"
        )


class MixtureSampler:
    """An endless stream of batches of ``(task name, example)`` from several pools.

    Each batch slot picks a task from `mixture_weights` and then an example of that task; each task's
    examples are visited in reshuffled epochs (no repeat until the task's pool is exhausted).
    """

    def __init__(
        self,
        pools: Mapping[str, Sequence[Example]],
        batch_size: int,
        seed: int,
        strategy: str = "proportional",
        temperature: float = 1.0,
    ) -> None:
        if batch_size <= 0:
            raise MetaloraDataError(f"batch_size must be positive, got {batch_size}")
        self.pools = {n: list(p) for n, p in pools.items()}
        self.names = list(self.pools)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.weights = mixture_weights({n: len(p) for n, p in self.pools.items()}, strategy, temperature)
        self._config = {
            "tasks": self.names,
            "sizes": [len(self.pools[n]) for n in self.names],
            "batch_size": batch_size,
            "seed": self.seed,
            "strategy": strategy,
            "temperature": float(temperature),
        }
        self._rng = _rng(self.seed, "mixture")
        self._order: dict[str, list[int]] = {n: [] for n in self.names}
        self.iteration = 0

    def _next_index(self, name: str) -> int:
        if not self._order[name]:
            self._order[name] = self._rng.permutation(len(self.pools[name])).tolist()
        return self._order[name].pop()

    def sample(self) -> list[tuple[str, Example]]:
        """The next batch."""
        p = np.array([self.weights[n] for n in self.names])
        picks = self._rng.choice(len(self.names), size=self.batch_size, p=p)
        batch = [(self.names[t], self.pools[self.names[t]][self._next_index(self.names[t])]) for t in picks]
        self.iteration += 1
        return batch

    def __iter__(self) -> Iterator[list[tuple[str, Example]]]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the generator state, the per-task epoch orders, the iteration count."""
        return {
            "config": self._config,
            "rng": self._rng.bit_generator.state,
            "order": {n: list(v) for n, v in self._order.items()},
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self._config, "MixtureSampler")
        self._rng.bit_generator.state = state["rng"]
        self._order = {n: list(state["order"][n]) for n in self.names}
        self.iteration = int(state["iteration"])


@dataclass
class Episode:
    """One task's share of a MeTA-LoRA iteration: a support set and a query set from its pool."""

    task: str
    task_id: int
    support: list[Example]
    query: list[Example]


class EpisodicSampler:
    """Episodes for MeTA-LoRA: each `sample()` picks ``n_tasks`` distinct tasks uniformly and, for each,
    a support set of ``support_size`` and a query set of ``query_size`` examples from that task's pool only.

    * ``with_replacement=False`` (default): support and query are disjoint and have no repeats, so every
      pool needs at least ``support_size + query_size`` examples; a smaller one is an error at
      construction naming the task and the sizes.
    * ``with_replacement=True``: every example of S and Q is drawn independently and uniformly (with
      replacement) from the pool, so any non-empty pool works, but S and Q may overlap and repeat.

    Task ids are the positions in ``pools`` (dict order) unless ``task_to_id`` is given. Deterministic
    given ``seed``; ``state_dict()`` / ``load_state_dict()`` continue the identical stream.
    """

    def __init__(
        self,
        pools: Mapping[str, Sequence[Example]],
        n_tasks: int,
        support_size: int,
        query_size: int,
        seed: int,
        with_replacement: bool = False,
        task_to_id: Mapping[str, int] | None = None,
    ) -> None:
        self.pools = {n: list(p) for n, p in pools.items()}
        self.names = list(self.pools)
        if not self.names:
            raise MetaloraDataError("EpisodicSampler needs at least one task pool")
        if not 1 <= n_tasks <= len(self.names):
            raise MetaloraDataError(
                f"n_tasks={n_tasks} must be between 1 and the number of tasks ({len(self.names)})"
            )
        if support_size < 1 or query_size < 1:
            raise MetaloraDataError(
                f"support_size and query_size must be >= 1, got {support_size}, {query_size}"
            )
        need = support_size + query_size
        for name, pool in self.pools.items():
            if not pool:
                raise MetaloraDataError(f"task {name!r} has an empty pool")
            if not with_replacement and len(pool) < need:
                raise MetaloraDataError(
                    f"task {name!r} has {len(pool)} examples in its pool, fewer than support_size + query_size = "
                    f"{support_size} + {query_size} = {need}; use a larger pool, smaller sets, or with_replacement=True"
                )
        self.task_to_id = (
            dict(task_to_id) if task_to_id is not None else {n: i for i, n in enumerate(self.names)}
        )
        missing = [n for n in self.names if n not in self.task_to_id]
        if missing:
            raise MetaloraDataError(f"tasks {missing} are not in task_to_id {self.task_to_id}")
        self.n_tasks = n_tasks
        self.support_size = support_size
        self.query_size = query_size
        self.seed = int(seed)
        self.with_replacement = with_replacement
        self._config = {
            "tasks": self.names,
            "sizes": [len(self.pools[n]) for n in self.names],
            "n_tasks": n_tasks,
            "support_size": support_size,
            "query_size": query_size,
            "seed": self.seed,
            "with_replacement": with_replacement,
        }
        self._rng = _rng(self.seed, "episodic")
        self.iteration = 0

    def sample(self) -> list[Episode]:
        """The next iteration's episodes (``n_tasks`` of them, distinct tasks)."""
        chosen = self._rng.choice(len(self.names), size=self.n_tasks, replace=False).tolist()
        episodes = []
        for t in chosen:
            name = self.names[t]
            pool = self.pools[name]
            need = self.support_size + self.query_size
            if self.with_replacement:
                idx = self._rng.integers(0, len(pool), size=need).tolist()
            else:
                idx = self._rng.choice(len(pool), size=need, replace=False).tolist()
            support = [pool[i] for i in idx[: self.support_size]]
            query = [pool[i] for i in idx[self.support_size :]]
            episodes.append(Episode(name, self.task_to_id[name], support, query))
        self.iteration += 1
        return episodes

    def __iter__(self) -> Iterator[list[Episode]]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the PCG64 state is a dict of ints)."""
        return {"config": self._config, "rng": self._rng.bit_generator.state, "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; a state saved with a different config (tasks, sizes, seed) raises."""
        _check_state(state, self._config, "EpisodicSampler")
        self._rng.bit_generator.state = dict(state["rng"])
        self.iteration = int(state["iteration"])
