"""META-LoRA sample reweighting: weight each training sample by how well its gradient agrees with a small
validation batch, estimated from rank-r activations and gradients at the LoRA bottlenecks.

One step (one AdamW step), for a global training batch T and a validation batch V of ``val_batch_size``
samples (default |T|, as in the published code) drawn from the run's validation set (M = N / ``val_ratio``
examples for a pool of N, 10:1 by default: ``reweight_data``), with ℓ_i a sample's mean next-token loss
over its response tokens:

    1. validation pass: forward V, backward Σ_v ℓ_v; record ā_v, ĝ_v at every site    (lora_grads.py)
    2. training pass:   forward T, backward Σ_i ℓ_i (unweighted); record ā_i, ĝ_i
    3. u_i = Σ_l (1/|V|) Σ_v (ā_i·ā_v)(ĝ_i·ĝ_v)
       w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ)           (Eq. 8, over the *global* batch, all ranks)
    4. ∇_θ Σ_i w_i ℓ_i with w held constant, into ``.grad``; the engine takes the AdamW step — unless
       Eq. 8 gave w = 0 with ``weights.fallback="skip"`` (``StepOutput.skip_update``: no AdamW step).

Step 4 is where the schemes differ (``scheme``):

* ``"fused"`` (default for plain PEFT LoRA): the backward of step 2 also forms every sample's gradient
  of A and B (``lora_grads.PerSampleLoRAGrads``); step 4 is Σ_i w_i ∇ℓ_i — *no second backward*. This
  is exact because w is a constant and samples of a causal LM do not interact (attention stays within
  a sample), so the gradient of Σ w_i ℓ_i at sample i's activations is w_i times the unweighted one.
* ``"two_backward"`` (any adapter; the published code's scheme): step 2's graph is retained and step
  4 is a second backward of Σ_i w_i ℓ_i.
* ``stats.similarity="exact"`` (reference): per-sample gradients by one backward per sample; u_i = ⟨∇ℓ_i,
  ∇L_V⟩ and step 4 reuses them.

Where the published code departs from the paper, the paper is the default and the code's choice an
option (all in ``ReweightConfig``'s sections, ``reweight_config.py``; resolved once into the strategy
objects of ``reweight_strategies.py``):

| choice | paper (default) | published code (option) |
|---|---|---|
| token reduction | response positions only | ``stats.positions="all"``: mean over all positions, padding and prompt |
| negative u | clipped to 0 | ``weights.negative="shift"``: u − 2·min(u) when min(u) < 0 |
| score scale | u as defined | (neither) ``direction.score="cosine"``: u_i / ‖∇ℓ_i‖; ``"layer_cosine"``: Σ_l of per-site cosines; our options |
| validation direction | ∇ of the mean validation loss | (neither) ``direction.balance="answer"``, ``direction.shared="remove"``: our options (``val_direction``) |
| no signal: u ≡ 0 (B = 0 ⇒ g = 0 at step 0) | Eq. 8 gives w = 0, so B never moves (``weights.no_signal="fallback"``) | step 0 unweighted (``published_code.unweighted_first_step``); ours, default: ``weights.no_signal="unweighted"``, one unweighted step whenever u ≡ 0, recorded |
| signal, all against: every u ≤ 0, some < 0 | w = 0, the batch's optimizer step skipped (default ``weights.fallback="skip"``), recorded | cannot happen (the shift makes u positive); ours: ``weights.fallback="uniform"`` (w = 1/B) |
| validation set | M = N/10 examples (a dataset ratio, ``val_ratio``) | a validation batch as large as the training batch (``val_batch_size`` default) |
| validation loss | only scores samples | ``published_code.val_step_every=N``: an AdamW step on the validation loss every N steps |
| validation statistics | per validation sample, then the mean of the products | ``direction.aggregation="mean"``: means first, then one product |
| validation refresh | every step | ``published_code.val_refresh_every=10`` (stats reused in between) |
| normalisation with several GPUs | over the global batch | (per rank) |
| an all-masked sample | weight 0, loss 0 | division by zero |

Remaining known difference: the published code takes g from the batch's token-mean loss (a sample's g
is scaled by its token count over the batch's); here g comes from ℓ_i, the sample's own mean.

With several processes the global batches are sharded B[rank::world]; validation statistics are
gathered from all ranks, u is gathered so every rank normalises w over the global batch, and the
per-rank Σ w_i ∇ℓ_i are summed — the update equals the single-process one. Under gradient
checkpointing (``train.gradient_checkpointing``, non-reentrant) the hooks of steps 1–2 fire again in the
recompute; ``lora_grads`` records only the original forward's, so u, w and the update are those without
checkpointing (tested to 1e-10 in float64). Reentrant checkpointing is refused: it forbids
``torch.autograd.grad``.

Run outputs besides the engine's: ``weights.jsonl`` (per step: sample ids, u, w, ℓ, ``case`` — ``eq8``,
``no_signal``, ``all_against`` or ``unweighted`` — and ``skipped``), at the end
``sample_weights.jsonl`` (each sample's mean B·w over the steps it was drawn) and ``weights_hist.png``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalora.adapters import adapter_parameters, is_task_routed, task_ids
from metalora.train import distributed as dist_utils
from metalora.train import val_direction
from metalora.train.batching import Feature, count_tokens, micro_batches
from metalora.train.counters import Counters
from metalora.train.distributed import gather_rows
from metalora.train.engine import Engine, EngineConfig, StepOutput
from metalora.train.logging import MetricsLogger
from metalora.train.loss import forward_losses
from metalora.train.multitask import EpochBatches
from metalora.train.reweight_config import (
    DirectionConfig,
    PublishedCodeConfig,
    ReweightConfig,
    ReweightConfigError,
    StatsConfig,
    WeightsConfig,
)
from metalora.train.reweight_strategies import (
    Captured,
    ValidationDirection,
    ValidationStats,
    Weighter,
    resolve_scorer,
    resolve_update,
)
from metalora.train.similarity import Weights, similarity_matrix, weight_statistics
from metalora.train.weight_log import mean_sample_weights, read_weight_log, summarize_weights

__all__ = [
    "DirectionConfig",
    "PublishedCodeConfig",
    "ReweightConfig",
    "ReweightConfigError",
    "ReweightResult",
    "Reweighting",
    "StatsConfig",
    "ValidationStats",
    "WeightsConfig",
    "forward_losses",
    "mean_sample_weights",
    "read_weight_log",
    "reweighted_gradient",
    "train_reweight",
    "validation_stats",
]

ForwardContext = Callable[[dict[str, Any]], contextlib.AbstractContextManager]


def default_context(model: nn.Module) -> ForwardContext:
    """Task routing from the batch's ``task_ids`` for task-routed adapters; nothing otherwise."""
    routed = is_task_routed(model)
    return lambda batch: task_ids(model, batch["task_ids"]) if routed else contextlib.nullcontext()


def _check_shardable(n: int, what: str) -> None:
    if n < dist_utils.world_size():
        raise ReweightConfigError(
            f"{what}={n} is smaller than the {dist_utils.world_size()} processes: every rank needs a sample"
        )


@dataclass
class ReweightResult:
    """One reweighted step, global (every rank holds the same values)."""

    loss: float
    """Σ_i w_i ℓ_i."""
    weights: torch.Tensor
    scores: torch.Tensor
    losses: torch.Tensor
    valid: torch.Tensor
    fallback: bool
    shifted: bool
    scheme: str
    metrics: dict[str, float] = field(default_factory=dict)
    case: str = "eq8"
    """``similarity.Weights.case``: ``eq8``, ``no_signal``, ``all_against`` or ``unweighted``."""
    skip: bool = False
    """Eq. 8 gave w = 0 with ``weights.fallback="skip"``: the batch's optimizer step is to be skipped."""


class Reweighting:
    """One model's reweighting step with its options resolved once (``reweight_strategies``): steps 1–4."""

    def __init__(self, model: nn.Module, config: ReweightConfig) -> None:
        self.model = model
        self.update = resolve_update(model, config)
        self.scorer = resolve_scorer(model, config)
        self.direction = ValidationDirection(config.direction)
        self.weighter = Weighter(config.weights)

    @property
    def scheme(self) -> str:
        return self.update.name

    def validation_stats(
        self,
        val_batch: dict[str, Any],
        total: int,
        context: ForwardContext | None = None,
        groups: Sequence[int] | None = None,
    ) -> ValidationStats:
        """1. Forward/backward of this rank's share of V; statistics combined over ranks (``total`` = global
        |V|). ``groups``: every global validation sample's answer group, for ``direction.balance``."""
        context = context or default_context(self.model)
        _refuse_reentrant_checkpointing(self.model)
        params = adapter_parameters(self.model)
        with context(val_batch), self.scorer.capture(val_batch):
            losses, _ = forward_losses(self.model, val_batch)
            grad, rows = self.scorer.validation_backward(losses, params, self.direction.needed)
        dist_utils.all_reduce_sum_(list(grad.values()))
        grad = {n: g / total for n, g in grad.items()}
        loss = dist_utils.sum_scalar(float(losses.detach().sum()), losses.device) / total
        stats = self.scorer.global_stats(total)
        coefficients = None
        if self.direction.needed:
            if rows is not None:
                rows = gather_rows(rows, total)
            gram = rows @ rows.T if rows is not None else similarity_matrix(stats, stats)
            coefficients = self.direction.coefficients(gram, groups)
        return ValidationStats(stats, grad, loss, total, coefficients=coefficients, per_sample=rows)

    def gradient(
        self,
        train_batch: dict[str, Any],
        val: ValidationStats,
        total: int,
        context: ForwardContext | None = None,
        uniform: bool = False,
    ) -> ReweightResult:
        """2–4 on this rank's share of T (``total`` = global |T|): adds Σ_{i local} w_i ∇ℓ_i to ``.grad``
        (not summed over ranks: the caller's ``sync_grads_`` does it). ``uniform``: w = 1/B."""
        context = context or default_context(self.model)
        _refuse_reentrant_checkpointing(self.model)
        params = adapter_parameters(self.model)
        with context(train_batch):
            captured = self._capture(train_batch, params)  # 2. forward, unweighted backward
            u_local = self.scorer.score(captured, val)  # 3. scores of this rank's samples …
            u = gather_rows(u_local.to(captured.losses.device), total)
            valid = gather_rows(captured.valid, total)
            w = self.weighter(u, valid, uniform)  # … weights over the global batch
            local_w = w.w[dist_utils.rank() :: dist_utils.world_size()].to(captured.losses.device)
            grad = self.update.weighted(local_w, captured, params)  # 4. ∇ Σ_i w_i ℓ_i, w constant
        for name, p in params.items():
            p.grad = grad[name] if p.grad is None else p.grad + grad[name]
        return self._result(w, u, gather_rows(captured.losses.detach(), total), valid)

    def _capture(self, batch: dict[str, Any], params: dict[str, nn.Parameter]) -> Captured:
        with self.scorer.capture(batch), self.update.capture():
            losses, valid = forward_losses(self.model, batch)
            rows = self.update.backward(losses, params)
        return Captured(losses, valid, self.scorer.captured_stats(), rows)

    def _result(
        self, w: Weights, u: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor
    ) -> ReweightResult:
        metrics = {
            **weight_statistics(w.w),
            "weight_fallback": float(w.fallback),
            "weight_skipped": float(w.skip),
            "u_mean": float(u.mean()),
            "u_frac_negative": float((u < 0).double().mean()),
            "loss_unweighted": float(losses[valid].mean()) if bool(valid.any()) else 0.0,
        }
        return ReweightResult(
            loss=float((w.w.to(losses) * losses).sum()),
            weights=w.w,
            scores=u,
            losses=losses,
            valid=valid,
            fallback=w.fallback,
            shifted=w.shifted,
            scheme=self.scheme,
            metrics=metrics,
            case=w.case,
            skip=w.skip,
        )


def _refuse_reentrant_checkpointing(model: nn.Module) -> None:
    """Reweighting takes its gradients with ``torch.autograd.grad``, which reentrant checkpointing (HF's
    default before transformers 5) refuses; non-reentrant checkpointing is exact (``lora_grads``)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        kwargs = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", {})
        if kwargs.get("use_reentrant", True) is not False:
            raise ReweightConfigError(
                "reweighting needs non-reentrant gradient checkpointing: set train.gradient_checkpointing"
                "=true, or call model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                '{"use_reentrant": False})'
            )


def resolve_scheme(model: nn.Module, config: ReweightConfig) -> str:
    """``exact``, ``fused`` or ``two_backward``: the update scheme ``config`` gives on ``model``."""
    return resolve_update(model, config).name


def validation_stats(
    model: nn.Module,
    val_batch: dict[str, Any],
    config: ReweightConfig,
    total: int,
    context: ForwardContext | None = None,
    groups: Sequence[int] | None = None,
) -> ValidationStats:
    """``Reweighting(model, config).validation_stats(...)``, for one-off calls."""
    return Reweighting(model, config).validation_stats(val_batch, total, context, groups)


def reweighted_gradient(
    model: nn.Module,
    train_batch: dict[str, Any],
    val: ValidationStats,
    config: ReweightConfig,
    total: int,
    context: ForwardContext | None = None,
    uniform: bool = False,
) -> ReweightResult:
    """``Reweighting(model, config).gradient(...)``, for one-off calls."""
    return Reweighting(model, config).gradient(train_batch, val, total, context, uniform)


# --- the algorithm on the engine -----------------------------------------------------------------------


class ReweightBatches:
    """Training and validation batch orders (seeded epochs, identical on every rank), checkpointed together.
    A validation batch holds ``val_batch_size`` samples (default: the training batch), at most the whole set."""

    def __init__(self, train: Sequence[Feature], val: Sequence[Feature], config: ReweightConfig) -> None:
        if not val:
            raise ReweightConfigError("reweighting needs validation features (any task or file)")
        self.train = EpochBatches(train, config.batch_size, config.seed, config.group_by_length)
        self.val = EpochBatches(val, min(config.effective_val_batch_size, len(val)), config.seed + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train.state_dict(), "val": self.val.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state["train"])
        self.val.load_state_dict(state["val"])


class Reweighter:
    """One META-LoRA step on the engine: validation statistics (refreshed every ``val_refresh_every``
    steps), the optional validation-loss step, the reweighted gradient synced over ranks, the logs."""

    def __init__(
        self, engine: Engine, batches: ReweightBatches, config: ReweightConfig, pad_token_id: int
    ) -> None:
        self.engine, self.batches, self.pad = engine, batches, pad_token_id
        self.published: PublishedCodeConfig = config.published_code
        self.reweighting = Reweighting(engine.model, config)
        self.val: ValidationStats | None = None
        self.weights_log = MetricsLogger(engine.run.weights, enabled=engine.is_main and config.log_weights)
        self._first = True

    def context(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(self.engine.routing(batch))
        stack.enter_context(self.engine.autocast())
        return stack

    def _collate(self, features: Sequence[Feature]) -> dict[str, Any]:
        return micro_batches(dist_utils.shard(features), self.pad, None)[0]

    def step(self, step: int) -> StepOutput:
        if self._first:  # a resumed run: drop weight records beyond the checkpoint
            self.weights_log.truncate_after(step)
            self._first = False
        metrics: dict[str, float] = {}
        samples, tokens = 0, 0
        if self.val is None or step % self.published.val_refresh_every == 0:
            val_features = self._refresh_validation()
            samples, tokens = len(val_features), count_tokens(val_features)
            every = self.published.val_step_every
            if every and step % every == 0:
                self._validation_optimizer_step()
                metrics["val_optimizer_step"] = 1.0
        train = self.batches.train.sample()
        _check_shardable(len(train), "batch size")
        self.engine.zero_grad()
        uniform = self.published.unweighted_first_step and step == 0
        result = self.reweighting.gradient(self._collate(train), self.val, len(train), self.context, uniform)
        self.engine.sync_grads_()
        self._log_weights(step, train, result)
        metrics.update(result.metrics)
        metrics["val_loss"] = self.val.loss
        return StepOutput(
            loss=result.loss,
            samples=samples + len(train),
            tokens=tokens + count_tokens(train),
            metrics=metrics,
            skip_update=result.skip,
        )

    def _refresh_validation(self) -> list[Feature]:
        """Draw the next validation batch and recompute its statistics; returns its features."""
        features = self.batches.val.sample()
        _check_shardable(len(features), "validation batch size")
        self.engine.zero_grad()
        self.val = self.reweighting.validation_stats(
            self._collate(features),
            len(features),
            self.context,
            groups=val_direction.answer_groups(features),
        )
        return features

    def _validation_optimizer_step(self) -> None:
        """Published code: an AdamW step on ∇L_V (counted as an optimizer step; not LR-scheduled)."""
        self.engine.set_grads({n: g.clone() for n, g in self.val.grad.items()})
        self.engine.optimizer.step()
        self.engine.zero_grad()
        self.engine.counters.optimizer_steps += 1

    def _log_weights(self, step: int, train: Sequence[Feature], result: ReweightResult) -> None:
        self.weights_log.log(
            {
                "step": step + 1,
                "sample_ids": [str(f["sample_id"]) for f in train],
                "weights": [round(float(x), 8) for x in result.weights],
                "u": [float(x) for x in result.scores],
                "loss": [round(float(x), 6) for x in result.losses],
                "fallback": result.fallback,
                "case": result.case,
                "skipped": result.skip,
            }
        )


def train_reweight(
    model: nn.Module,
    train_features: Sequence[Feature],
    val_features: Sequence[Feature],
    config: ReweightConfig,
    engine_config: EngineConfig,
    run_dir: str | Path,
    pad_token_id: int,
) -> Counters:
    """Train ``model``'s adapter with META-LoRA reweighting; writes the engine's outputs plus the weight logs."""
    engine = Engine(model, engine_config, run_dir)
    batches = ReweightBatches(train_features, val_features, config)
    reweighter = Reweighter(engine, batches, config, pad_token_id)
    counters = engine.fit(
        reweighter.step,
        stateful=batches,
        desc="META-LoRA reweight",
        extra_state={"algorithm": "reweight", "scheme": reweighter.reweighting.scheme},
    )
    if engine.is_main and config.log_weights and engine.run.weights.is_file():
        summarize_weights(engine.run_dir)
    return counters
