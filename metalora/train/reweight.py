"""META-LoRA sample reweighting: weight each training sample by how well its gradient agrees with a small
validation batch, estimated from rank-r activations and gradients at the LoRA bottlenecks.

One step (one AdamW step), for a global training batch T and a validation batch V (|T|:|V| = ``val_ratio``,
10:1 by default), with ℓ_i a sample's mean next-token loss over its response tokens:

    1. validation pass: forward V, backward Σ_v ℓ_v; record ā_v, ĝ_v at every site    (similarity.py)
    2. training pass:   forward T, backward Σ_i ℓ_i (unweighted); record ā_i, ĝ_i
    3. u_i = Σ_l (1/|V|) Σ_v (ā_i·ā_v)(ĝ_i·ĝ_v)
       w_i = max(u_i, 0) / (Σ_j max(u_j, 0) + δ)           (over the *global* batch, all ranks)
    4. ∇_θ Σ_i w_i ℓ_i with w held constant, into ``.grad``; the engine takes the AdamW step.

Step 4 is where the schemes differ (``scheme``):

* ``"fused"`` (default for plain PEFT LoRA): the backward of step 2 also forms every sample's gradient
  of A and B (``similarity.PerSampleLoRAGrads``); step 4 is Σ_i w_i ∇ℓ_i — *no second backward*. This
  is exact because w is a constant and samples of a causal LM do not interact (attention stays within
  a sample), so the gradient of Σ w_i ℓ_i at sample i's activations is w_i times the unweighted one.
* ``"two_backward"`` (any adapter; the published code's scheme): step 2's graph is retained and step
  4 is a second backward of Σ_i w_i ℓ_i.
* ``similarity="exact"`` (reference): per-sample gradients by one backward per sample; u_i = ⟨∇ℓ_i,
  ∇L_V⟩ and step 4 reuses them.

Where the published code departs from the paper, the paper is the default and the code's choice an
option (all in ``ReweightConfig``):

| choice | paper (default) | published code (option) |
|---|---|---|
| token reduction | response positions only | ``positions="all"``: mean over all positions, padding and prompt |
| negative u | clipped to 0 | ``negative="shift"``: u − 2·min(u) when min(u) < 0 |
| score scale | u as defined | (neither) ``score="cosine"``: u_i / ‖∇ℓ_i‖; ``"layer_cosine"``: Σ_l of per-site cosines; our options |
| validation direction | ∇ of the mean validation loss | (neither) ``val_balance="answer"``, ``shared_direction="remove"``: our options (``val_direction``) |
| first step | weighted; Σ max(u,0) ≤ δ (B = 0 ⇒ g = 0) falls back to uniform w, recorded | ``unweighted_first_step=True`` |
| validation loss | only scores samples | ``val_step_every=N``: an AdamW step on the validation loss every N steps |
| validation statistics | per validation sample, then the mean of the products | ``val_aggregation="mean"``: means first, then one product |
| validation refresh | every step | ``val_refresh_every=10`` (stats reused in between) |
| normalisation with several GPUs | over the global batch | (per rank) |
| an all-masked sample | weight 0, loss 0 | division by zero |

Remaining known difference: the published code takes g from the batch's token-mean loss (a sample's g
is scaled by its token count over the batch's); here g comes from ℓ_i, the sample's own mean.

With several processes the global batches are sharded B[rank::world]; validation statistics are
gathered from all ranks, u is gathered so every rank normalises w over the global batch, and the
per-rank Σ w_i ∇ℓ_i are summed — the update equals the single-process one. Gradient checkpointing is
not supported (the hooks would fire again in the recompute).

Run outputs besides the engine's: ``weights.jsonl`` (per step: sample ids, u, w, ℓ), at the end
``sample_weights.jsonl`` (each sample's mean B·w over the steps it was drawn) and ``weights_hist.png``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from metalora.adapters import adapter_parameters, is_task_routed, task_ids
from metalora.data.tokenize import per_sample_loss
from metalora.train import distributed as dist_utils
from metalora.train import similarity as sim
from metalora.train import val_direction
from metalora.train.batching import Feature, count_tokens, micro_batches
from metalora.train.counters import Counters
from metalora.train.engine import Engine, EngineConfig, StepOutput
from metalora.train.logging import MetricsLogger
from metalora.train.multitask import EpochBatches

SCHEMES = ("auto", "fused", "two_backward")
VAL_RATIOS_DOC = "5:1, 10:1 (default), 50:1"


class ReweightConfigError(ValueError):
    """A reweighting setting outside what it allows."""


@dataclass
class ReweightConfig:
    """The ``reweight:`` section of a run config."""

    batch_size: int = 8
    """Global training samples per step (over all ranks)."""
    val_ratio: int = 10
    """Training samples per validation sample (``5``, ``10``, ``50``…): |V| = max(1, batch_size // val_ratio)."""
    val_batch_size: int | None = None
    """Set |V| directly (overrides ``val_ratio``)."""
    similarity: str = "low_rank"
    """``low_rank`` (L: bottleneck z and ∂ℓ/∂z), ``dense`` (D: layer input x and ∂ℓ/∂h), ``exact`` (reference)."""
    modules: str = "all"
    """Adapter layers that contribute to u: ``all``, ``attention`` or ``mlp``."""
    positions: str = "response"
    """Token reduction: ``response`` (paper), ``nonpad``, ``all`` (published code: mean over every position)."""
    val_aggregation: str = "per_sample"
    """``per_sample`` (mean over v of the products) or ``mean`` (published code: product of the means)."""
    val_balance: str = "none"
    """``none`` (paper) or ``answer`` (our option): validation samples grouped by answer, each answer pulls
    with unit strength, so the validation batch's net residual on the answer drops out of u
    (``val_direction``; needs ``val_aggregation="per_sample"``)."""
    shared_direction: str = "keep"
    """``keep`` (paper) or ``remove`` (our option): the validation gradients' top principal direction, the
    one all inputs share, is projected out of the validation direction (``val_direction``)."""
    score: str = "dot"
    """``dot`` u_i = Σ_l (ā_i·ā_v)(ĝ_i·ĝ_v) (paper) or ``cosine``: u_i / ‖∇ℓ_i‖ (our option, not in the
    paper or its code: the direction of a sample's gradient, not its size, decides its weight), or
    ``layer_cosine``: u_i = Σ_l Σ_v β_v cos(∇_l ℓ_i, ∇_l ℓ_v), every site (bottleneck, dense layer, or
    ``exact``'s adapted layer) votes with the same weight (our option; ``similarity.unit_stats``; needs
    ``val_aggregation="per_sample"``)."""
    negative: str = "clip"
    """``clip`` max(u, 0) (paper) or ``shift`` u − 2·min(u) when min(u) < 0 (published code)."""
    delta: float = 1e-30
    """δ of w = max(u,0)/(Σ max(u,0) + δ). It only guards 0/0: u's scale changes by orders of magnitude
    (B starts at 0), so a larger absolute δ would silently shrink the step; Σ ≤ δ triggers ``fallback``."""
    fallback: str = "uniform"
    """When Σ max(u,0) ≤ δ: ``uniform`` w = 1/B over samples with a loss, or ``zero`` (a zero gradient; the
    published code skips the step instead — with AdamW a zero gradient still moves θ by its momentum)."""
    unweighted_first_step: bool = False
    """Published code: step 0 is a plain, unweighted step."""
    val_step_every: int = 0
    """Published code (10): every N steps also take an AdamW step on the validation loss (0: never)."""
    val_refresh_every: int = 1
    """Recompute the validation statistics every N steps (published code: 10); reused in between."""
    scheme: str = "auto"
    """``fused`` (one backward; plain PEFT LoRA only), ``two_backward`` (any adapter), ``auto``: fused when possible."""
    seed: int = 0
    """Seed of the training and validation batch order."""
    log_weights: bool = True
    """Write ``weights.jsonl``, ``sample_weights.jsonl`` and ``weights_hist.png`` in the run directory."""

    def __post_init__(self) -> None:
        checks = [
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size > 0, "a positive integer"),
            (
                "val_ratio",
                isinstance(self.val_ratio, int) and self.val_ratio > 0,
                f"a positive integer ({VAL_RATIOS_DOC})",
            ),
            ("val_batch_size", self.val_batch_size is None or self.val_batch_size > 0, "null or positive"),
            ("similarity", self.similarity in sim.SIMILARITIES, f"one of {sim.SIMILARITIES}"),
            ("modules", self.modules in sim.MODULE_SUBSETS, f"one of {sim.MODULE_SUBSETS}"),
            ("positions", self.positions in sim.POSITIONS, f"one of {sim.POSITIONS}"),
            (
                "val_aggregation",
                self.val_aggregation in sim.VAL_AGGREGATIONS,
                f"one of {sim.VAL_AGGREGATIONS}",
            ),
            (
                "val_balance",
                self.val_balance in val_direction.VAL_BALANCES,
                f"one of {val_direction.VAL_BALANCES}",
            ),
            (
                "shared_direction",
                self.shared_direction in val_direction.SHARED_DIRECTIONS,
                f"one of {val_direction.SHARED_DIRECTIONS}",
            ),
            (
                "val_aggregation",
                self.val_aggregation == "per_sample"
                or val_direction.is_default(self.val_balance, self.shared_direction),
                "'per_sample' with val_balance or shared_direction (they weight single validation samples)",
            ),
            ("score", self.score in sim.SCORES, f"one of {sim.SCORES}"),
            (
                "val_aggregation",
                self.val_aggregation == "per_sample" or self.score != "layer_cosine",
                "'per_sample' with score='layer_cosine' (it compares single validation samples)",
            ),
            ("negative", self.negative in sim.NEGATIVES, f"one of {sim.NEGATIVES}"),
            ("fallback", self.fallback in sim.FALLBACKS, f"one of {sim.FALLBACKS}"),
            ("delta", self.delta >= 0, "a non-negative number"),
            ("val_step_every", self.val_step_every >= 0, "a non-negative integer"),
            ("val_refresh_every", self.val_refresh_every > 0, "a positive integer"),
            ("scheme", self.scheme in SCHEMES, f"one of {SCHEMES}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ReweightConfigError(f"reweight.{name}={getattr(self, name)!r}: expected {expected}")

    @property
    def effective_val_batch_size(self) -> int:
        return self.val_batch_size or max(1, self.batch_size // self.val_ratio)


# --- per-sample loss and the forward ------------------------------------------------------------------

ForwardContext = Callable[[dict[str, Any]], contextlib.AbstractContextManager]


def default_context(model: nn.Module) -> ForwardContext:
    """Task routing from the batch's ``task_ids`` for task-routed adapters; nothing otherwise."""
    routed = is_task_routed(model)
    return lambda batch: task_ids(model, batch["task_ids"]) if routed else contextlib.nullcontext()


def forward_losses(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses of one collated batch (call inside the batch's routing/autocast context)."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    return per_sample_loss(logits, batch["labels"])


def _grads(
    loss: torch.Tensor, params: dict[str, nn.Parameter], retain_graph: bool = False
) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=retain_graph, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)
    }


# --- several processes: rows in the global order -------------------------------------------------------


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """The global [total, ...] tensor from each rank's rows of ``shard`` (global index rank + j·world)."""
    world = dist_utils.world_size()
    if world == 1:
        return local
    if local.dtype == torch.bool:  # not every backend gathers bool
        return gather_rows(local.to(torch.uint8), total).bool()
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = local.new_zeros((total, *local.shape[1:]))
    for r, part in enumerate(parts):
        count = len(range(r, total, world))
        out[r::world] = part[:count]
    return out


def _check_shardable(n: int, what: str) -> None:
    if n < dist_utils.world_size():
        raise ReweightConfigError(
            f"{what}={n} is smaller than the {dist_utils.world_size()} processes: every rank needs a sample"
        )


# --- 1. validation statistics --------------------------------------------------------------------------


@dataclass
class ValidationStats:
    """What the training pass is scored against (global: the same on every rank)."""

    stats: dict[str, sim.SiteStats]
    """Per validation sample ā_v, ĝ_v by site ([|V|, d], all ranks' samples); empty for ``exact``."""
    grad: dict[str, torch.Tensor]
    """∇_θ L_V, L_V = (1/|V|) Σ_v ℓ_v, by adapter tensor."""
    loss: float
    """L_V."""
    size: int
    coefficients: torch.Tensor | None = None
    """β [|V|] of ``val_direction`` (float64), or None for the paper's β = 1/|V|."""
    per_sample: torch.Tensor | None = None
    """``exact`` with β: [|V|, P] float64 per-sample gradients of the selected adapter tensors (each layer
    normalised for ``score="layer_cosine"``)."""


def validation_stats(
    model: nn.Module,
    val_batch: dict[str, Any],
    config: ReweightConfig,
    total: int,
    context: ForwardContext | None = None,
    groups: Sequence[int] | None = None,
) -> ValidationStats:
    """Forward/backward of this rank's share of V; statistics combined over ranks (``total`` = global |V|).

    ``groups``: the answer group of every global validation sample (``val_direction.answer_groups``), for
    ``val_balance="answer"``."""
    context = context or default_context(model)
    params = adapter_parameters(model)
    directed = not val_direction.is_default(config.val_balance, config.shared_direction)
    layer_cosine = config.score == "layer_cosine"
    per_sample = None
    capture = (
        None
        if config.similarity == "exact"
        else sim.StatCapture(
            sim.similarity_sites(model, config.similarity, config.modules), config.similarity
        )
    )
    weights = sim.position_weights(val_batch["labels"], val_batch["attention_mask"], config.positions)
    with context(val_batch), capture.capture(weights) if capture else contextlib.nullcontext():
        losses, _ = forward_losses(model, val_batch)
        if (directed or layer_cosine) and config.similarity == "exact":
            rows = sim.per_sample_grads(losses, params)
            grad = {n: g.sum(0) for n, g in rows.items()}
            per_sample = _exact_rows(model, rows, config)
        else:
            grad = _grads(losses.sum(), params)  # Σ_v ℓ_v: every sample's own ∂ℓ_v at the sites
    tensors = list(grad.values())
    dist_utils.all_reduce_sum_(tensors)
    grad = {n: g / total for n, g in grad.items()}
    loss = dist_utils.sum_scalar(float(losses.detach().sum()), losses.device) / total
    stats = {}
    if capture is not None:
        stats = {
            n: sim.SiteStats(gather_rows(s.a, total), gather_rows(s.g, total))
            for n, s in capture.stats().items()
        }
        if layer_cosine:
            stats = sim.unit_stats(stats)
    coefficients = None
    if directed or layer_cosine:  # layer_cosine with the paper's direction: β = 1/|V| on normalised rows
        if per_sample is not None:
            per_sample = gather_rows(per_sample, total)
            gram = per_sample @ per_sample.T
        else:
            gram = sim.similarity_matrix(stats, stats)
        coefficients = val_direction.validation_coefficients(
            gram, groups, config.val_balance, config.shared_direction
        )
    return ValidationStats(
        stats=stats, grad=grad, loss=loss, size=total, coefficients=coefficients, per_sample=per_sample
    )


def _exact_rows(model: nn.Module, rows: dict[str, torch.Tensor], config: ReweightConfig) -> torch.Tensor:
    """[B, P] float64 per-sample gradients of the selected adapter tensors (``exact``), each layer divided by
    its norm for ``score="layer_cosine"``."""
    if config.score == "layer_cosine":
        return sim.layer_unit_rows(rows, sim.layer_parameter_names(model, config.modules))
    chosen = sim.selected_parameters(model, config.modules)
    return torch.cat([rows[n].flatten(1).to(torch.float64) for n in chosen], 1)


# --- 2–4. the reweighted gradient -----------------------------------------------------------------------


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


def resolve_scheme(model: nn.Module, config: ReweightConfig) -> str:
    """``exact`` for exact similarity; otherwise fused where every adapter tensor is plain PEFT LoRA."""
    if config.similarity == "exact":
        return "exact"
    if config.scheme == "fused" and not sim.fused_supported(model):
        raise ReweightConfigError(
            "reweight.scheme='fused' needs plain PEFT LoRA (no DoRA/metalora layers); use two_backward"
        )
    if config.scheme == "auto":
        return "fused" if sim.fused_supported(model) else "two_backward"
    return config.scheme


def reweighted_gradient(
    model: nn.Module,
    train_batch: dict[str, Any],
    val: ValidationStats,
    config: ReweightConfig,
    total: int,
    context: ForwardContext | None = None,
    uniform: bool = False,
) -> ReweightResult:
    """Steps 2–4 on this rank's share of T (``total`` = global |T|): adds Σ_{i local} w_i ∇ℓ_i to ``.grad``.

    ``.grad`` is *not* summed over ranks here (the caller's ``sync_grads_`` does it). ``uniform``: skip the
    scores and use w = 1/B (the published code's unweighted first step).
    """
    context = context or default_context(model)
    if getattr(model, "is_activation_checkpointing", getattr(model, "gradient_checkpointing", False)) is True:
        raise ReweightConfigError(
            "reweighting does not support gradient checkpointing (hooks would fire twice)"
        )
    params = adapter_parameters(model)
    scheme = resolve_scheme(model, config)
    capture = (
        None
        if scheme == "exact"
        else sim.StatCapture(
            sim.similarity_sites(model, config.similarity, config.modules), config.similarity
        )
    )
    fused = sim.PerSampleLoRAGrads(model) if scheme == "fused" else None
    weights = sim.position_weights(train_batch["labels"], train_batch["attention_mask"], config.positions)
    with context(train_batch):
        with (
            capture.capture(weights) if capture else contextlib.nullcontext(),
            fused.capture() if fused else contextlib.nullcontext(),
        ):
            losses, valid = forward_losses(model, train_batch)
            per_sample = None
            if scheme == "exact":
                per_sample = sim.per_sample_grads(losses, params, retain_graph=False)
            else:  # one backward of the unweighted Σ_i ℓ_i: the hooks record ā, ĝ (and fused per-sample grads)
                _grads(losses.sum(), params, retain_graph=scheme == "two_backward")
        # 3. scores of this rank's samples, weights over the global batch
        if scheme == "exact":
            chosen = sim.selected_parameters(model, config.modules)
            if val.coefficients is not None:  # ⟨∇ℓ_i, Σ_v β_v ∇ℓ_v⟩
                assert val.per_sample is not None
                mine = _exact_rows(model, per_sample, config)
                direction = val.coefficients.to(val.per_sample) @ val.per_sample
                u_local = mine @ direction.to(mine.device)
            else:
                u_local = sum(
                    (per_sample[n].flatten(1).to(torch.float64) @ val.grad[n].flatten().to(torch.float64))
                    for n in chosen
                )
            if config.score == "cosine":
                norms = sum(per_sample[n].flatten(1).to(torch.float64).pow(2).sum(1) for n in chosen).sqrt()
                u_local = sim.cosine_scores(u_local, norms)
        else:
            train_stats = capture.stats()
            if config.score == "layer_cosine":
                train_stats = sim.unit_stats(train_stats)
            u_local = sim.similarity_scores(train_stats, val.stats, config.val_aggregation, val.coefficients)
            if config.score == "cosine":
                u_local = sim.cosine_scores(u_local, sim.sample_norms(train_stats))
        u = gather_rows(u_local.to(losses.device), total)
        all_losses = gather_rows(losses.detach(), total)
        all_valid = gather_rows(valid, total)
        if uniform:
            w = sim.clipped_weights(torch.zeros_like(u), fallback="uniform", valid=all_valid)
        else:
            w = sim.clipped_weights(u, config.delta, config.negative, config.fallback, valid=all_valid)
        local_w = w.w[dist_utils.rank() :: dist_utils.world_size()].to(losses.device)
        # 4. ∇ Σ_i w_i ℓ_i, w constant
        if scheme == "two_backward":
            grad = _grads((local_w.to(losses.dtype) * losses).sum(), params)
        elif scheme == "fused":
            grad = fused.weighted(local_w, params)
        else:
            grad = {n: torch.einsum("b,b...->...", local_w.to(g), g) for n, g in per_sample.items()}
    for name, p in params.items():
        p.grad = grad[name] if p.grad is None else p.grad + grad[name]
    metrics = {
        **sim.weight_statistics(w.w),
        "weight_fallback": float(w.fallback),
        "u_mean": float(u.mean()),
        "u_frac_negative": float((u < 0).double().mean()),
        "loss_unweighted": float(all_losses[all_valid].mean()) if bool(all_valid.any()) else 0.0,
    }
    return ReweightResult(
        loss=float((w.w.to(all_losses) * all_losses).sum()),
        weights=w.w,
        scores=u,
        losses=all_losses,
        valid=all_valid,
        fallback=w.fallback,
        shifted=w.shifted,
        scheme=scheme,
        metrics=metrics,
    )


# --- the algorithm on the engine -----------------------------------------------------------------------


class ReweightBatches:
    """Training and validation batch orders (seeded epochs, identical on every rank), checkpointed together."""

    def __init__(self, train: Sequence[Feature], val: Sequence[Feature], config: ReweightConfig) -> None:
        if not val:
            raise ReweightConfigError("reweighting needs validation features (any task or file)")
        self.train = EpochBatches(train, config.batch_size, config.seed)
        self.val = EpochBatches(val, config.effective_val_batch_size, config.seed + 1)

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
        self.engine, self.batches, self.config, self.pad = engine, batches, config, pad_token_id
        self.val: ValidationStats | None = None
        self.val_features: list[Feature] = []
        self.weights_log = MetricsLogger(
            engine.run_dir / "weights.jsonl", enabled=engine.is_main and config.log_weights
        )
        self._first = True

    def context(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(self.engine.routing(batch))
        stack.enter_context(self.engine.autocast())
        return stack

    def _collate(self, features: Sequence[Feature]) -> dict[str, Any]:
        return micro_batches(dist_utils.shard(features), self.pad, None)[0]

    def step(self, step: int) -> StepOutput:
        cfg, engine = self.config, self.engine
        if self._first:  # a resumed run: drop weight records beyond the checkpoint
            self.weights_log.truncate_after(step)
            self._first = False
        metrics: dict[str, float] = {}
        samples, tokens = 0, 0
        if self.val is None or step % cfg.val_refresh_every == 0:
            self.val_features = self.batches.val.sample()
            _check_shardable(len(self.val_features), "validation batch size")
            engine.zero_grad()
            self.val = validation_stats(
                engine.model,
                self._collate(self.val_features),
                cfg,
                len(self.val_features),
                self.context,
                groups=val_direction.answer_groups(self.val_features),
            )
            samples, tokens = len(self.val_features), count_tokens(self.val_features)
            if cfg.val_step_every and step % cfg.val_step_every == 0:
                self._validation_optimizer_step()
                metrics["val_optimizer_step"] = 1.0
        train = self.batches.train.sample()
        _check_shardable(len(train), "batch size")
        engine.zero_grad()
        result = reweighted_gradient(
            engine.model,
            self._collate(train),
            self.val,
            cfg,
            len(train),
            self.context,
            uniform=cfg.unweighted_first_step and step == 0,
        )
        engine.sync_grads_()
        self._log_weights(step, train, result)
        metrics.update(result.metrics)
        metrics["val_loss"] = self.val.loss
        return StepOutput(
            loss=result.loss,
            samples=samples + len(train),
            tokens=tokens + count_tokens(train),
            metrics=metrics,
        )

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
        extra_state={"algorithm": "reweight", "scheme": resolve_scheme(model, config)},
    )
    if engine.is_main and config.log_weights and (engine.run_dir / "weights.jsonl").is_file():
        summarize_weights(engine.run_dir)
    return counters


# --- observability -------------------------------------------------------------------------------------


def read_weight_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``weights.jsonl`` (the last one per step, should a resume have repeated any)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / "weights.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "step" in record and "weights" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def mean_sample_weights(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per sample id: the mean of B·w over the steps it was drawn (1 = a uniform share) and how often."""
    sums: dict[str, list[float]] = {}
    for r in records:
        b = len(r["weights"])
        for sid, w in zip(r["sample_ids"], r["weights"], strict=True):
            sums.setdefault(sid, []).append(b * w)
    return {sid: {"mean_relative_weight": sum(v) / len(v), "times_drawn": len(v)} for sid, v in sums.items()}


def summarize_weights(run_dir: str | Path) -> None:
    """Write ``sample_weights.jsonl`` and the histogram ``weights_hist.png`` from ``weights.jsonl``."""
    from metalora import atomic

    run_dir = Path(run_dir)
    records = read_weight_log(run_dir)
    per_sample = mean_sample_weights(records)
    atomic.write_text(
        run_dir / "sample_weights.jsonl",
        "".join(json.dumps({"sample_id": k, **v}) + "\n" for k, v in sorted(per_sample.items())),
    )
    plot_weight_histogram(records, per_sample, run_dir / "weights_hist.png")


def plot_weight_histogram(
    records: Sequence[dict[str, Any]], per_sample: dict[str, dict[str, float]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = [len(r["weights"]) * w for r in records for w in r["weights"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(relative, bins=40, color="tab:blue")
    axes[0].axvline(1.0, color="k", ls="--", lw=1, label="uniform (1/B)")
    axes[0].set(xlabel="B·w (per step, per sample)", ylabel="count", title="sample weights over all steps")
    axes[0].legend()
    axes[1].hist([v["mean_relative_weight"] for v in per_sample.values()], bins=40, color="tab:orange")
    axes[1].set(xlabel="mean B·w of a sample", ylabel="samples", title="per-sample mean weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
