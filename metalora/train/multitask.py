"""Multi-task LoRA baselines: LoRA-MT (one adapter on the mixed tasks), LoRA-ST (one adapter per task),
and the few-shot LoRA protocol of the MeTA-LoRA paper.

One optimizer step, with B the global batch (``batch_size`` samples drawn from the union of all tasks'
training features, reshuffled every epoch) and N_B its label-token count:

    θ ← AdamW(θ, ∇_θ (1/N_B) Σ_{x ∈ B} Σ_{t ∈ labels(x)} ℓ(x, t))

The batch is split across ranks (B[rank::world]) and each rank's share, sorted by length, into micro-batches
of ``micro_batch_size`` (gradient accumulation; sorted, each micro-batch pads less: 8 mixed commonsense
samples cut into micro-batches of 2 occupy 0.52× the padded tokens of one batch of 8,
``benchmarks/padding.py``); every micro-batch's loss is divided by the *global* N_B and
the gradients summed over micro-batches and ranks, so the update equals the single-process full-batch
one whatever the split. Any adapter type works; task-routed ones (MTL-LoRA, MoELoRA) get each sample's
task id from the batch.

Few-shot protocol (paper): 50 examples per task for 5 epochs, 100 per task for 10 epochs
(``FEW_SHOT_EPOCHS``); ``steps_for_epochs`` turns epochs into optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from metalora.rundir import RunDir
from metalora.train import distributed as dist_utils
from metalora.train.batching import Feature, count_tokens, length_grouped_order, longest_first, micro_batches
from metalora.train.counters import Counters
from metalora.train.engine import Engine, EngineConfig, StepOutput
from metalora.train.loss import count_label_tokens

FEW_SHOT_EPOCHS: dict[int, int] = {50: 5, 100: 10}
"""The paper's few-shot LoRA protocol: examples per task → epochs."""


class MultitaskConfigError(ValueError):
    """A multi-task setting outside what it allows."""


@dataclass
class MultitaskConfig:
    """The ``multitask:`` section of a run config."""

    batch_size: int = 8
    """Global samples per optimizer step (over all ranks and micro-batches)."""
    micro_batch_size: int | None = None
    """Per-rank micro-batch for gradient accumulation (None: the rank's whole share at once), cut from the
    share sorted by length: the same update with less padding."""
    epochs: float | None = None
    """Train for this many epochs over the features (sets ``train.max_steps``); None keeps max_steps."""
    seed: int = 0
    """Seed of the epoch shuffles."""
    protocol: str | None = None
    """``few_shot``: the paper's few-shot LoRA protocol, epochs from data.examples_per_task (the runner
    applies it); None: ``epochs`` / ``train.max_steps`` as given."""
    group_by_length: bool = False
    """Batches of similar lengths (HF ``Trainer``'s option of the same name; ``batching.length_grouped_order``):
    less padding, the same samples per epoch, other batch compositions, so off by default (results stay
    those of the plain shuffle)."""
    packing: bool = False
    """Padding-free packing: each micro-batch's samples concatenated into one row with per-sample positions
    and block-causal attention (``data.collate_packed``): no padding token at all, the same per-sample losses
    and summed gradient (to float rounding). Not for task-routed adapters (MTL-LoRA, MoELoRA), whose routing
    is per row."""

    def __post_init__(self) -> None:
        if self.protocol not in (None, "few_shot"):
            raise MultitaskConfigError(f"multitask.protocol={self.protocol!r}: expected null or 'few_shot'")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise MultitaskConfigError(
                f"multitask.batch_size={self.batch_size!r}: expected a positive integer"
            )
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise MultitaskConfigError(
                f"multitask.micro_batch_size={self.micro_batch_size!r}: expected positive"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise MultitaskConfigError(
                f"multitask.epochs={self.epochs!r}: expected a positive number or null"
            )


def few_shot_epochs(examples_per_task: int) -> int:
    """Epochs of the paper's few-shot LoRA protocol for 50 or 100 examples per task."""
    if examples_per_task not in FEW_SHOT_EPOCHS:
        raise MultitaskConfigError(
            f"the few-shot protocol is defined for {sorted(FEW_SHOT_EPOCHS)} examples per task, got {examples_per_task}"
        )
    return FEW_SHOT_EPOCHS[examples_per_task]


def steps_for_epochs(num_examples: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``num_examples`` in batches of ``batch_size``."""
    return max(1, math.ceil(epochs * num_examples / batch_size))


class EpochBatches:
    """Global batches from a list of features: a fresh seeded permutation every epoch, batches wrap
    across epoch boundaries (every batch is full). Identical on every rank; stateful for exact resume.
    ``group_by_length``: each epoch's permutation regrouped by ``length_grouped_order``."""

    def __init__(
        self, features: Sequence[Feature], batch_size: int, seed: int, group_by_length: bool = False
    ) -> None:
        if not features:
            raise MultitaskConfigError("no training features")
        self.features = list(features)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.group_by_length = bool(group_by_length)
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.features)).tolist()
        if not self.group_by_length:
            return order
        lengths = [len(f["input_ids"]) for f in self.features]
        return length_grouped_order(order, lengths, self.batch_size, rng)

    def sample(self) -> list[Feature]:
        batch = []
        while len(batch) < self.batch_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.cursor : self.cursor + self.batch_size - len(batch)]
            batch += [self.features[i] for i in take]
            self.cursor += len(take)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "size": len(self.features),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = (len(self.features), self.seed, self.batch_size, self.group_by_length)
        saved = (state["size"], state["seed"], state["batch_size"], state.get("group_by_length", False))
        if saved != mine:
            raise MultitaskConfigError(
                f"batch state was saved for (size, seed, batch_size, group_by_length)={saved}, "
                f"this run has {mine}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def multitask_step(
    engine: Engine,
    batch: Sequence[Feature],
    config: MultitaskConfig,
    pad_token_id: int,
    task_names: Sequence[str] | None = None,
) -> StepOutput:
    """∇ of the global mean-token loss of ``batch`` into ``.grad`` (data parallel, accumulated).

    With ``task_names`` (task id → name) the step also reports ``loss/<task>``: the mean token loss of each
    task's rows in the batch (summed over ranks), so mixed-task runs get per-task loss curves."""
    label_tokens = count_label_tokens(batch)  # global N_B: every rank holds the whole batch
    share = dist_utils.shard(batch)
    if config.micro_batch_size or config.group_by_length:  # micro-batches of similar lengths: less
        share = longest_first(share)  # padding, the same summed gradient
    local = micro_batches(share, pad_token_id, config.micro_batch_size, packed=config.packing)
    per_task: dict[int, list[float]] = {}
    take_part = (
        local or engine.lockstep
    )  # sharded: every rank takes part in every pass, with or without samples
    loss = (
        engine.backward(local, normalizer=float(max(label_tokens, 1)), per_task=per_task)
        if take_part
        else 0.0
    )
    engine.sync_grads_()
    metrics = {}
    if task_names is not None:
        for task_id in sorted({int(f["task_id"]) for f in batch}):  # the same ids, in order, on every rank
            loss_sum, tokens = per_task.get(task_id, [0.0, 0.0])
            tokens = engine.sum_over_ranks(tokens)
            if tokens > 0:
                metrics[f"loss/{task_names[task_id]}"] = engine.sum_over_ranks(loss_sum) / tokens
            else:
                engine.sum_over_ranks(loss_sum)  # keep the collectives matched across ranks
    return StepOutput(
        loss=engine.sum_over_ranks(loss), samples=len(batch), tokens=count_tokens(batch), metrics=metrics
    )


def train_multitask(
    model: nn.Module,
    features: Sequence[Feature],
    config: MultitaskConfig,
    engine_config: EngineConfig,
    run_dir: str | Path,
    pad_token_id: int,
    desc: str = "LoRA-MT",
    task_names: Sequence[str] | None = None,
) -> Counters:
    """LoRA-MT: train ``model``'s adapter on the mixed ``features`` of all tasks (``task_names``: task id →
    name, for per-task loss curves)."""
    if config.epochs is not None:
        engine_config.max_steps = steps_for_epochs(len(features), config.batch_size, config.epochs)
    engine = Engine(model, engine_config, run_dir)
    if config.packing and engine.routed:
        raise MultitaskConfigError(
            "multitask.packing=true with a task-routed adapter (MTL-LoRA, MoELoRA): it routes each row to one "
            "task, and a packed row holds several samples; set multitask.packing=false"
        )
    batches = EpochBatches(features, config.batch_size, config.seed, config.group_by_length)

    def step(_: int) -> StepOutput:
        return multitask_step(engine, batches.sample(), config, pad_token_id, task_names)

    extra = {"algorithm": "lora_mt"}
    return engine.fit(step, stateful=batches, desc=desc, extra_state=extra, shardable=True, zero=True)


def train_single_task(
    make_model: Callable[[str], nn.Module],
    features_by_task: Mapping[str, Sequence[Feature]],
    config: MultitaskConfig,
    engine_config: EngineConfig,
    run_dir: str | Path,
    pad_token_id: int,
) -> dict[str, Counters]:
    """LoRA-ST: one adapter per task, each trained alone in ``run_dir/tasks/<task>/``.

    ``make_model(task)`` returns a fresh adapted base model for that task.
    """
    results = {}
    for task, features in features_by_task.items():
        task_config = EngineConfig(**{**engine_config.__dict__})
        results[task] = train_multitask(
            make_model(task),
            features,
            config,
            task_config,
            RunDir(run_dir).task(task).root,
            pad_token_id,
            desc=f"LoRA-ST {task}",
        )
    return results
