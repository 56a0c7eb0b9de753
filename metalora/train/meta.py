"""MeTA-LoRA: two-stage, first-order meta-learning of one shared LoRA adapter (and its -STA ablation).

Each iteration (one outer optimizer step), with θ the adapter tensors and L the mean-token loss:

    sample n tasks T_1..T_n; for each, a support set S_i and a disjoint query set Q_i from its pool
    for i = 1..n:
        θ_i ← θ                                   (a copy of the adapter tensors only)
        repeat k times:  θ_i ← θ_i − α ∇_θ L_{S_i}(θ_i)        (plain SGD, inner rate α)
        g_i ← ∇_θ L_{Q_i}(θ_i)                    (first-order: no backprop through the inner steps)
        θ ← restored
    θ ← AdamW(θ, (1/n) Σ_i g_i, lr = β)           (one outer step; engine ``train.lr`` is β)

Defaults (the paper's): n=2, k=3, |S|=|Q|=8, α=5e-6, β=2e-6, r=16 on q,k,v,o. ``sta=True`` is the
-STA ablation: no inner steps, g_i = ∇ L_{Q_i}(θ). Samples are counted as the paper counts them,
n·(k·|S| + |Q|) per iteration (64 at the defaults); optimizer steps count outer steps.

With several processes the n episodes of an iteration (sampled identically on every rank) are split
across ranks (episodes[rank::world]); each rank sums its g_i, the sums are all-reduced and divided by n,
so every rank takes the identical outer step. Sharded (``train.sharding: fsdp``) that cannot work: FSDP2
needs every rank in every forward and holds one logical θ, so every rank runs every episode on its share
of S and of Q (S[rank::world], data parallel inside the episode), each loss normalised by the episode's
*global* token (or sample) count; FSDP's reduce-scatter sums the shares' gradients, the inner SGD step is
applied to each rank's shard of θ_i, and g_i's shards are summed over episodes (no all-reduce left). For task-routed adapters (MTL-LoRA, MoELoRA) the task
id of every forward comes from the episode (the collated batch's ``task_ids``).

Only the adapter tensors are snapshotted and restored (``Engine.snapshot``/``restore``); the model is
never cloned (which is what makes learn2learn's ``clone()`` unfit here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalora.data import EpisodicSampler
from metalora.train import distributed as dist_utils
from metalora.train.batching import Feature, count_tokens, micro_batches
from metalora.train.counters import Counters
from metalora.train.engine import Engine, EngineConfig, StepOutput
from metalora.train.loss import count_label_tokens


class MetaConfigError(ValueError):
    """A MeTA-LoRA setting outside what it allows."""


@dataclass
class MetaConfig:
    """The ``meta:`` section of a run config (the outer rate β is ``train.lr``)."""

    n_tasks: int = 2
    """n, tasks per iteration."""
    inner_steps: int = 3
    """k, SGD steps on the support set per task."""
    support_size: int = 8
    """|S|, support samples per task."""
    query_size: int = 8
    """|Q|, query samples per task (disjoint from the support set)."""
    inner_lr: float = 5e-6
    """α, the inner SGD rate."""
    sta: bool = False
    """-STA ablation: no inner steps, query gradients at θ."""
    micro_batch_size: int | None = None
    """Split support/query sets into micro-batches of this size (memory only; the math is unchanged)."""
    with_replacement: bool = False
    """Sample S and Q with replacement (allows pools smaller than |S|+|Q|; S and Q may then overlap)."""
    seed: int = 0
    """Seed of the episodic sampler."""
    loss_reduction: str = "token"
    """How L_S and L_Q reduce over a set: ``token`` (the token mean over the whole set, as HF's causal-LM
    loss and LoRA-MT here do; our default, so that MeTA-LoRA and its baselines optimise the same loss) or
    ``sample`` (the paper's L: the mean over samples of each sample's token mean, so short answers weigh
    as much as long ones)."""

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("token", "sample"):
            raise MetaConfigError(
                f"meta.loss_reduction={self.loss_reduction!r}: expected 'token' or 'sample'"
            )
        for name in ("n_tasks", "support_size", "query_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise MetaConfigError(f"meta.{name}={getattr(self, name)!r}: expected a positive integer")
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 0):
            raise MetaConfigError(f"meta.inner_steps={self.inner_steps!r}: expected a non-negative integer")
        if self.inner_lr < 0:
            raise MetaConfigError(f"meta.inner_lr={self.inner_lr!r}: expected a non-negative number")

    @property
    def effective_inner_steps(self) -> int:
        return 0 if self.sta else self.inner_steps

    def samples_per_iteration(self) -> int:
        """n·(k·|S| + |Q|): what one iteration processes (the paper's count)."""
        return self.n_tasks * (self.effective_inner_steps * self.support_size + self.query_size)


def set_normalizer(features: Sequence[Feature], reduction: str) -> float:
    """What a set's loss is divided by: its label tokens (``token``) or its samples (``sample``)."""
    return float(max(count_label_tokens(features) if reduction == "token" else len(features), 1))


def task_query_grad(
    engine: Engine,
    support: Sequence[Feature],
    query: Sequence[Feature],
    config: MetaConfig,
    pad_token_id: int,
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """For one task: k SGD steps on L_S from θ, then ∇L_Q at θ_i (first-order). θ is restored on return.

    Returns (query loss at θ_i, support loss before the first inner step or nan, g_i by adapter tensor).
    Sharded, this rank's share of S and Q: the losses are its parts (summed over ranks by the caller), the
    gradients FSDP's sums over ranks (the local shards).
    """
    reduction, split = config.loss_reduction, dist_utils.shard if engine.sharded else list
    theta = engine.snapshot() if config.effective_inner_steps else None
    support_batches = micro_batches(split(support), pad_token_id, config.micro_batch_size)
    support_loss = float("nan")
    for step in range(config.effective_inner_steps):
        engine.zero_grad()
        loss = engine.backward(support_batches, set_normalizer(support, reduction), reduction=reduction)
        support_loss = loss if step == 0 else support_loss  # ∇_θ L_S(θ_i) above
        engine.sgd_(config.inner_lr)  # θ_i ← θ_i − α ∇ L_S(θ_i)
    engine.zero_grad()
    query_batches = micro_batches(split(query), pad_token_id, config.micro_batch_size)
    query_loss = engine.backward(
        query_batches, set_normalizer(query, reduction), reduction=reduction
    )  # ∇ L_Q(θ_i)
    grads = engine.grads()
    engine.zero_grad()
    if theta is not None:
        engine.restore(theta)  # θ_i → θ
    return query_loss, support_loss, grads


def meta_step(engine: Engine, episodes: Sequence[Any], config: MetaConfig, pad_token_id: int) -> StepOutput:
    """One MeTA-LoRA iteration up to (not including) the outer AdamW step, which the engine takes.

    Leaves (1/n) Σ_i g_i in ``.grad`` of every adapter tensor, identical on every rank.
    """
    n = len(episodes)
    summed: dict[str, torch.Tensor] | None = None
    query_total, support_total = 0.0, 0.0
    query_losses = [0.0] * n  # per episode; filled by the rank that runs it, summed over ranks below
    mine = range(n) if engine.sharded else range(dist_utils.rank(), n, dist_utils.world_size())
    for i in mine:  # this rank's tasks (sharded: every task, on this rank's share of its samples)
        episode = episodes[i]
        q_loss, s_loss, grads = task_query_grad(engine, episode.support, episode.query, config, pad_token_id)
        summed = grads if summed is None else {k: summed[k] + g for k, g in grads.items()}
        query_total += q_loss
        support_total += 0.0 if config.sta else s_loss
        query_losses[i] = q_loss
    if summed is None:  # more ranks than tasks: this rank contributes zeros
        summed = {k: torch.zeros_like(p) for k, p in engine.params.items()}
    engine.set_grads(summed)
    engine.sync_grads_(scale=1.0 / n)  # (1/n) Σ_i g_i over all ranks
    k = config.effective_inner_steps
    metrics = {"query_loss": engine.sum_over_ranks(query_total) / n}
    for episode, q_loss in zip(episodes, query_losses, strict=True):  # per-task curves for the report
        metrics[f"loss/{episode.task}"] = engine.sum_over_ranks(q_loss)
    if k:
        metrics["support_loss"] = engine.sum_over_ranks(support_total) / n
    return StepOutput(
        loss=metrics["query_loss"],
        samples=sum(k * len(e.support) + len(e.query) for e in episodes),
        tokens=sum(k * count_tokens(e.support) + count_tokens(e.query) for e in episodes),
        metrics=metrics,
    )


def build_sampler(
    pools: dict[str, list[Feature]], config: MetaConfig, task_to_id: dict[str, int] | None = None
):
    """The data layer's ``EpisodicSampler`` over per-task pools of tokenized features."""
    return EpisodicSampler(
        pools,
        config.n_tasks,
        config.support_size,
        config.query_size,
        seed=config.seed,
        with_replacement=config.with_replacement,
        task_to_id=task_to_id,
    )


def train_meta(
    model: nn.Module,
    sampler: Any,
    config: MetaConfig,
    engine_config: EngineConfig,
    run_dir: str | Path,
    pad_token_id: int,
) -> Counters:
    """Train ``model``'s adapter with MeTA-LoRA (or -STA); writes ``run_dir/{metrics.jsonl, checkpoints/, adapter/}``.

    ``sampler`` yields episodes (``.sample()`` → list of objects with ``support`` and ``query`` feature
    lists) and has ``state_dict``/``load_state_dict``; ``build_sampler`` makes the standard one.
    """
    if getattr(sampler, "n_tasks", config.n_tasks) != config.n_tasks:
        raise MetaConfigError(
            f"sampler draws {sampler.n_tasks} tasks per iteration, meta.n_tasks={config.n_tasks}"
        )
    engine = Engine(model, engine_config, run_dir)

    def step(_: int) -> StepOutput:
        return meta_step(engine, sampler.sample(), config, pad_token_id)

    return engine.fit(
        step,
        stateful=sampler,
        desc="MeTA-LoRA-STA" if config.sta else "MeTA-LoRA",
        extra_state={"algorithm": "meta", "sta": config.sta},
        shardable=True,
    )
