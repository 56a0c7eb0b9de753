"""The one training engine every metalora algorithm runs on.

**Why accelerate directly and not transformers' ``Trainer``.** MeTA-LoRA's iteration is not "one
batch, one backward, one step": per task it snapshots the adapter, takes k SGD steps on a support set,
takes a gradient on a query set at the adapted point, restores, and only then takes one AdamW step on
the averaged query gradients; ``Trainer``'s ``training_step``/``compute_loss`` hooks would have to be
bent around a loop they do not model (and its DDP wrapper synchronises every backward, including the
inner ones that must stay local). So the engine owns a plain loop and uses accelerate for what it is
good at: launching (``accelerate launch`` / ``torchrun``), the process group and device
(``PartialState``), and seeding. Mixed precision is ``torch.autocast`` (bf16 on CPU and GPU) rather
than ``Accelerator(mixed_precision=…)``, because accelerate's state is process-global and refuses a
second configuration in the same process (a benchmark or LoRA-ST runs several trainings in one).

**Division of labour.** An algorithm supplies ``step_fn(step) -> StepOutput``: it runs its
forward/backward passes with the engine's building blocks (``backward``, ``snapshot``/``restore``,
``sgd_``, ``sync_grads_``) and leaves the gradient of the outer update in ``.grad`` of the adapter
parameters, synchronised across ranks. The engine does the rest, once, for every algorithm: the
NaN/inf guard, gradient clipping, the AdamW step and LR schedule, counters, ``metrics.jsonl`` and the
progress bar, periodic atomic checkpoints and exact resume, the final adapter. It also turns on gradient
checkpointing (``train.gradient_checkpointing``) when it takes the model, so every algorithm (LoRA-ST: each
task's model) gets it from this one place.

Only ``adapter_parameters(model)`` are ever stepped, snapshotted, restored or checkpointed.

**Sharding** (``train.sharding: fsdp``, or ``accelerate launch`` with an FSDP config; ``train/sharding.py``):
with several processes the engine hands the model to torch's FSDP2 ``fully_shard`` (decoder layers, then
the root) before building the optimizer, so the adapter tensors, their gradients and the AdamW state are
DTensor shards. FSDP's reduce-scatter sums the gradients (divide factor 1) and ``sync_grads_`` leaves them
alone; ``backward`` pads a rank's passes with empty ones so every rank runs as many; ``snapshot``,
``restore``, ``sgd_``, ``grads`` work on the local shards; the gradient norm is the global one (torch's
``clip_grad_norm_`` over DTensors); checkpoints and the final adapter hold gathered full tensors, in the
unsharded format, and load back into shards. Algorithms declare ``fit(shardable=True)``; others are refused.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from torch import nn

from metalora import atomic
from metalora.adapters import adapter_parameters, is_task_routed, save_adapter, task_ids
from metalora.adapters.io import AdapterLoadError, check_adapter_tensors
from metalora.errors import RunInterrupted
from metalora.rundir import RunDir
from metalora.train import checkpoint, sharding
from metalora.train import distributed as dist_utils
from metalora.train.counters import Counters, peak_memory
from metalora.train.logging import MetricsLogger, Progress
from metalora.train.loss import label_token_count, token_loss_rows, token_loss_segments
from metalora.train.signals import deferred_signals
from metalora.train.zero import STAGES as ZERO_STAGES
from metalora.train.zero import Zero

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/inf: the run stopped before stepping on it."""


class EngineConfigError(ValueError):
    """An engine setting outside what it allows."""


@dataclass
class EngineConfig:
    """Settings shared by every algorithm (the ``train:`` section of a run config)."""

    max_steps: int = 100
    """Optimizer steps to take (MeTA-LoRA: outer iterations)."""
    lr: float = 1e-4
    """Peak learning rate of the AdamW step (MeTA-LoRA: the outer rate β)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "constant"
    """LR schedule after warmup: ``constant``, ``cosine`` (to ``min_lr_ratio``·lr) or ``linear``."""
    warmup_steps: int = 0
    """Linear warmup steps (lr·(s+1)/warmup for s < warmup)."""
    min_lr_ratio: float = 0.0
    """Final LR of the cosine/linear decay as a fraction of ``lr``."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this (None: no clipping; the norm is still logged)."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (autocast; adapter weights and optimizer state stay fp32)."""
    device: str = "auto"
    """``auto`` (the accelerate device: GPU if present), ``cpu`` or ``cuda``."""
    seed: int = 0
    """Seed of Python, NumPy and torch RNGs (data samplers take their own seed)."""
    log_every: int = 1
    """Write a ``metrics.jsonl`` record every this many steps (and at the last)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (0: all)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs the ``tensorboard`` package)."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    resume: bool = True
    """Continue from ``checkpoints/latest`` of the run directory if there is one."""
    sharding: str = "none"
    """``none`` (full replicas, gradients all-reduced), ``fsdp`` (torch FSDP2 ``fully_shard`` of every decoder
    layer and the root: parameters, gradients and AdamW state sharded over the processes; ``train/sharding.py``),
    or ``zero2`` / ``zero3`` (DeepSpeed ZeRO: gradients and AdamW state, and with ZeRO-3 every parameter,
    partitioned; LoRA-MT and LoRA-ST; ``train/zero.py``). ``accelerate launch`` with an FSDP or DeepSpeed config
    selects it whatever this says. One process: no effect."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them (HF activation
    checkpointing, non-reentrant): less activation memory for one more forward per backward. The gradients
    are those without it, for every algorithm and adapter."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        checks = [
            ("max_steps", isinstance(self.max_steps, int) and self.max_steps > 0, "a positive integer"),
            ("lr", self.lr >= 0, "a non-negative number"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("device", self.device in DEVICES, f"one of {DEVICES}"),
            ("sharding", self.sharding in sharding.SHARDINGS, f"one of {sharding.SHARDINGS}"),
            ("warmup_steps", self.warmup_steps >= 0, "a non-negative integer"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "a fraction in [0, 1]"),
            ("log_every", self.log_every > 0, "a positive integer"),
            ("checkpoint_every", self.checkpoint_every >= 0, "a non-negative integer"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "None or positive"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise EngineConfigError(f"train.{name}={getattr(self, name)!r}: expected {expected}")


@dataclass
class StepOutput:
    """What an algorithm's step reports (all values global: the same on every rank)."""

    loss: float
    """The loss to log and guard (MeTA-LoRA: the mean query loss)."""
    samples: int
    """Samples processed by this step's forward/backward passes (see ``counters``)."""
    tokens: int
    """Non-padding input tokens of those passes."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra values for ``metrics.jsonl``."""
    skip_update: bool = False
    """Take no AdamW step for this batch (reweighting: Eq. 8 gave w = 0): θ and the optimizer state stay
    as they are and no optimizer step is counted; the LR schedule still advances (it follows the step)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on HF activation checkpointing of ``model``'s decoder layers, non-reentrant.

    Non-reentrant (``use_reentrant=False``) because reweighting takes its gradients with
    ``torch.autograd.grad``, which reentrant checkpointing refuses, and because its recompute feeds the
    original graph, where the adapters' and the reweighting hooks' tensor hooks sit (task routing reads the
    last forward's ids in the recompute: ``adapters/routing.py``). HF checkpoints a layer only in training
    mode, which ``Engine.fit`` sets. transformers ≥ 5 names it ``activation_checkpointing_enable``.
    """
    kwargs = {"use_reentrant": False}
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise EngineConfigError(
            f"train.gradient_checkpointing=true: {type(model).__name__} does not support gradient "
            "checkpointing (a transformers model whose layers do is needed)"
        )
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lr_multiplier(config: EngineConfig) -> Callable[[int], float]:
    """LR factor for the step about to be taken (``LambdaLR``'s convention: called with 0, 1, …)."""
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)

    return factor


class Engine:
    """Holds the model, its adapter optimizer and the run's outputs; runs an algorithm's steps."""

    def __init__(self, model: nn.Module, config: EngineConfig, run_dir: str | Path) -> None:
        self.config = config
        self.state = PartialState(cpu=config.device == "cpu")
        self.device = torch.device("cpu") if config.device == "cpu" else self.state.device
        if config.device == "cuda" and self.device.type != "cuda":
            raise EngineConfigError("train.device='cuda' but no CUDA device is available")
        self.is_main = self.state.is_main_process
        set_seed(config.seed)
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.sharding = sharding.resolve(config.sharding)
        self.sharded = self.sharding.mode == "fsdp" and dist_utils.world_size() > 1
        if self.sharded:
            sharding.shard_model(model, self.sharding.reshard_after_forward)
        several = dist_utils.world_size() > 1
        self.zero_stage = ZERO_STAGES.get(self.sharding.mode) if several else None
        # DeepSpeed wraps the model when training starts, after a resume has loaded the adapter
        self.zero: Zero | None = None
        self.params: dict[str, nn.Parameter] = adapter_parameters(model)
        self.routed = is_task_routed(model)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(config))
        self.counters = Counters()
        self.run = RunDir(run_dir)
        self.run_dir = self.run.root
        self.checkpoint_dir = self.run.checkpoints
        self.logger = MetricsLogger(self.run.metrics, enabled=self.is_main, tensorboard=config.tensorboard)
        self.step = 0
        self._log_sharding()

    @property
    def lockstep(self) -> bool:
        """Every rank must run every forward and backward (FSDP's and ZeRO's collectives pair up)."""
        return self.sharded or self.zero_stage is not None

    def _log_sharding(self) -> None:
        """Say which sharding the run uses and who chose it (stderr, ``metrics.jsonl``, ``counters.json``)."""
        if not (self.lockstep or self.sharding.source == "accelerate"):
            return  # the default: nothing to say
        mode = self.sharding.mode if self.lockstep else "none"
        self.logger.log({"event": "sharding", "sharding": mode, "source": self.sharding.source})
        kind = "DeepSpeed" if self.sharding.mode in ZERO_STAGES else "FSDP"
        how = (
            f"accelerate launch's {kind} config" if self.sharding.source == "accelerate" else "train.sharding"
        )
        what = (
            f"FSDP2 fully_shard over {self.world_size} processes"
            if self.sharded
            else f"DeepSpeed ZeRO-{self.zero_stage} over {self.world_size} processes"
            if self.zero_stage
            else "one process"
        )
        if self.is_main:
            print(f"metalora: sharding={mode} ({what}) from {how}", file=sys.stderr, flush=True)

    # --- building blocks for algorithms -------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return dist_utils.world_size()

    @property
    def rank(self) -> int:
        return dist_utils.rank()

    def routing(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Route the batch's samples to their tasks (task-routed adapters only); wrap forward and backward."""
        return task_ids(self.model, batch["task_ids"]) if self.routed else contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def loss_rows(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample Σ token losses [B], per-sample label tokens [B]) of one batch; call inside
        ``routing(batch)``. A packed batch (``data.collate_packed``: one row, ``position_ids`` restarting per
        sample, no attention mask, so attention is block-causal per sample) gives one entry per sample."""
        input_ids = batch["input_ids"].to(self.device)
        model = self.zero if self.zero is not None else self.model  # ZeRO: through DeepSpeed's engine
        if "position_ids" in batch:
            with self.autocast():
                logits = model(
                    input_ids=input_ids, position_ids=batch["position_ids"].to(self.device), use_cache=False
                ).logits
            return token_loss_segments(logits, batch["labels"], batch["segment_ids"], len(batch["task_ids"]))
        attention_mask = batch["attention_mask"].to(self.device)
        with self.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return token_loss_rows(logits, batch["labels"])

    def backward(
        self,
        batches: Sequence[dict[str, Any]],
        normalizer: float | None = None,
        per_task: dict[int, list[float]] | None = None,
        reduction: str = "token",
    ) -> float:
        """Accumulate ∇ [loss] into ``.grad``; returns that loss value.

        ``reduction="token"``: loss = Σ_b Σ_tokens ℓ / normalizer, the token mean over all ``batches``
        (``normalizer`` defaults to their label tokens, however they are split into micro-batches; data
        parallelism passes the global count). ``reduction="sample"``: loss = Σ_i (Σ_t ℓ_it / T_i) /
        normalizer, the mean over samples of each sample's token mean (``normalizer`` defaults to the
        number of samples). ``per_task``, if given, accumulates ``{task id: [Σ token losses, label
        tokens]}`` of this rank's rows.
        """
        if reduction not in ("token", "sample"):
            raise ValueError(f"reduction={reduction!r}: expected 'token' or 'sample'")
        if normalizer is None and reduction == "sample":
            normalizer = float(sum(len(b["task_ids"]) for b in batches))  # samples, packed or not
        elif normalizer is None:
            normalizer = float(sum(label_token_count(b["labels"]) for b in batches))
        normalizer = max(normalizer, 1.0)
        total = 0.0
        if self.lockstep:  # every rank runs as many forward/backward passes as the busiest one
            batches = [
                *batches,
                *[empty_batch()] * (dist_utils.max_int(len(batches), self.device) - len(batches)),
            ]
        for index, batch in enumerate(batches):
            with self.routing(batch):
                rows, counts = self.loss_rows(batch)
                per_row = rows / counts.clamp(min=1) if reduction == "sample" else rows
                loss_sum = per_row.sum()
                if self.zero is not None:  # DeepSpeed reduces after the step's last micro-batch
                    self.zero.backward(loss_sum / normalizer, boundary=index == len(batches) - 1)
                else:
                    (loss_sum / normalizer).backward()
            total += float(loss_sum.detach())
            if per_task is not None:
                for task_id, row, count in zip(
                    batch["task_ids"].tolist(), rows.detach().tolist(), counts.tolist(), strict=True
                ):
                    acc = per_task.setdefault(int(task_id), [0.0, 0.0])
                    acc[0] += row
                    acc[1] += count
        return total / normalizer

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def grads(self) -> dict[str, torch.Tensor]:
        """The current ``.grad`` of every adapter tensor (zeros where a tensor got no gradient)."""
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params.items()}

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.grad = grads[name]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter tensors θ (the model itself is never copied)."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.copy_(snapshot[n])

    @torch.no_grad()
    def sgd_(self, lr: float) -> None:
        """One plain SGD step θ ← θ − lr·∇ on the adapter tensors (MeTA-LoRA's inner update)."""
        for p in self.params.values():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)

    def sync_grads_(self, scale: float = 1.0) -> None:
        """``.grad`` ← scale · Σ_ranks ``.grad`` for every adapter tensor (identity in one process). A sharded
        tensor's ``.grad`` is already FSDP's reduce-scattered sum: only scaled. Under ZeRO, DeepSpeed has
        reduced them at the step's last backward: nothing to do."""
        if self.zero is not None:
            if scale != 1.0:
                raise sharding.ShardingError("scaled gradients are not supported under DeepSpeed ZeRO")
            return
        grads = self.grads()
        self.set_grads(grads)
        tensors = list(grads.values())
        dist_utils.all_reduce_sum_([g for g in tensors if not sharding.is_sharded(g)])
        if scale != 1.0:
            for g in tensors:
                g.mul_(scale)

    def sum_over_ranks(self, value: float) -> float:
        return dist_utils.sum_scalar(value, self.device)

    # --- the loop -------------------------------------------------------------------------------------

    def fit(
        self,
        step_fn: Callable[[int], StepOutput],
        stateful: Stateful | None = None,
        desc: str = "train",
        extra_state: dict[str, Any] | None = None,
        shardable: bool = False,
        zero: bool = False,
    ) -> Counters:
        """Run ``step_fn`` for steps ``start..max_steps-1`` with an AdamW step after each; returns the counters.

        ``stateful`` (the data sampler) is checkpointed and restored with everything else. ``shardable``: the
        algorithm runs every forward on every rank (what FSDP needs); ``zero``: it also backpropagates once per
        step, through ``backward`` (what DeepSpeed ZeRO needs). A sharded run of any other is refused.
        """
        self._refuse_sharding(desc, shardable, zero)
        cfg = self.config
        start = self._resume(stateful) if cfg.resume else 0
        self._start_zero()
        self.model.train()
        progress = Progress(cfg.max_steps, start, self.is_main and cfg.progress, desc)
        wall_before, t_start = self.counters.wall_time_s, time.perf_counter()
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(deferred_signals())
            stack.callback(progress.close)
            for step in range(start, cfg.max_steps):
                self.step = step
                t_step = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                self.zero_grad()
                out = step_fn(step)
                grad_norm = self.outer_step(out, step)
                self.counters.wall_time_s = wall_before + time.perf_counter() - t_start
                seconds = time.perf_counter() - t_step
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    self._log_step(done, out, lr, grad_norm, seconds)
                progress.update(out.loss, out.samples / max(seconds, 1e-9))
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                    self.save_checkpoint(done, stateful, extra_state)
                if done < cfg.max_steps:
                    self._stop_if_signalled(caught(), done, stateful, extra_state)
        self.step = cfg.max_steps
        self.save_checkpoint(cfg.max_steps, stateful, extra_state)
        self._finish(status="completed")
        tensors = self._full_params() if self.lockstep else None  # every rank gathers
        if self.is_main:
            save_adapter(self.model, self.run.adapter, tensors=tensors)
        dist_utils.barrier()
        self.logger.close()
        return self.counters

    def _log_step(self, done: int, out: StepOutput, lr: float, grad_norm: float, seconds: float) -> None:
        """One ``metrics.jsonl`` record after step ``done``."""
        self.logger.log(
            {
                "step": done,
                "loss": out.loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "samples": self.counters.samples,
                "tokens": self.counters.tokens,
                "samples_per_s": out.samples / max(seconds, 1e-9),
                "step_time_s": seconds,
                **out.metrics,
            }
        )

    def _refuse_sharding(self, desc: str, shardable: bool, zero: bool) -> None:
        if self.sharded and not shardable:
            raise sharding.ShardingError(
                f"{desc} is not supported with sharding (train.sharding=fsdp or an accelerate FSDP config): "
                "it needs every rank's full activations and adapter tensors; run it with train.sharding=none"
            )
        if self.zero_stage and not zero:
            raise sharding.ShardingError(
                f"{desc} is not supported with DeepSpeed ZeRO (train.sharding={self.sharding.mode} or an "
                "accelerate DeepSpeed config): it updates or reads the adapter between backward passes, which "
                "DeepSpeed's partitioned step does not allow; use train.sharding=fsdp (MeTA-LoRA) or none"
            )

    def _start_zero(self) -> None:
        """Wrap the model and optimizer in DeepSpeed (ZeRO runs, once; after a resume has loaded the adapter)."""
        if self.zero_stage and self.zero is None:
            self.zero = Zero(self.model, self.optimizer, self.zero_stage, self.config.max_grad_norm)

    def _full_params(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, whole, on every rank (a collective when sharded)."""
        if self.zero is not None:
            return self.zero.full_params(self.params)
        return sharding.full_tensors(self.params)

    def _stop_if_signalled(
        self, signum: int | None, done: int, stateful: Stateful | None, extra_state: dict[str, Any] | None
    ) -> None:
        """After a step: if any rank got SIGINT/SIGTERM, checkpoint and raise ``RunInterrupted``."""
        if self.sum_over_ranks(1.0 if signum else 0.0) == 0:
            return
        signum = signum or signal.SIGTERM  # a rank that got none stops with its peers
        path = self.save_checkpoint(done, stateful, extra_state)
        self._finish(status=f"interrupted by {signal.Signals(signum).name} after step {done}")
        self.logger.log({"event": "interrupted", "signal": signal.Signals(signum).name, "step": done})
        self.logger.close()
        raise RunInterrupted(signum, done, path)

    def outer_step(self, out: StepOutput, step: int) -> float:
        """After ``step_fn``: guard, clip, AdamW step (none if ``out.skip_update``), LR schedule, counters;
        returns the gradient norm."""
        grad_norm = self._guarded_grad_norm(out, step)
        if not out.skip_update:
            (self.zero or self.optimizer).step()
        self.scheduler.step()
        self.zero_grad()
        self.counters.update(out.samples, out.tokens)
        self.counters.optimizer_steps -= int(out.skip_update)  # a skipped update is no optimizer step
        return grad_norm

    def _guarded_grad_norm(self, out: StepOutput, step: int) -> float:
        """Clip (if configured) and return the gradient norm; stop the run on a NaN/inf loss or gradient."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        if self.zero is not None:  # DeepSpeed clips inside its step (gradient_clipping = max_grad_norm)
            norm = self.zero.grad_norm(self.params)
        else:
            norm = float(
                sharding.full_tensor(torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm))
            )
        if not (math.isfinite(out.loss) and math.isfinite(norm)):
            last = checkpoint.latest(self.checkpoint_dir)
            self.logger.log({"event": "non_finite", "step": step + 1, "loss": out.loss, "grad_norm": norm})
            self._finish(status=f"stopped: non-finite loss/gradient at step {step + 1}")
            self.zero_grad()
            raise NonFiniteLossError(
                f"non-finite {'loss' if not math.isfinite(out.loss) else 'gradient'} at step {step + 1} "
                f"(loss={out.loss}, grad_norm={norm}); the run stopped without taking that step. "
                f"Last good checkpoint: {last if last is not None else 'none (no checkpoint was written yet)'}. "
                "Lower the learning rate, enable train.max_grad_norm, or check the data of this step."
            )
        return norm

    def _finish(self, status: str) -> None:
        self.counters.peak_memory_bytes, self.counters.peak_memory_kind = peak_memory(self.device)
        if self.is_main:
            sharded = {"sharding": self.sharding.mode, "world_size": self.world_size} if self.lockstep else {}
            atomic.write_json(self.run.counters, {"status": status, **sharded, **self.counters.to_dict()})

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(
        self, step: int, stateful: Stateful | None = None, extra_state: dict[str, Any] | None = None
    ) -> Path:
        previous = checkpoint.latest(self.checkpoint_dir) if self.is_main else None
        name = checkpoint.step_dir_name(step)
        written = previous is not None and previous.name == name  # resumed at the end: nothing to write
        if self.sum_over_ranks(float(written)) > 0:  # decided by rank 0, for every rank
            return self.checkpoint_dir / name
        self.counters.peak_memory_bytes, self.counters.peak_memory_kind = peak_memory(self.device)
        if self.zero is not None:
            optimizer = self.zero.optimizer_state(self.params)
        elif self.sharded:
            optimizer = sharding.full_optimizer_state(self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        state = {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "counters": self.counters.to_dict(),
            "sampler": stateful.state_dict() if stateful is not None else None,
            "engine_config": asdict(self.config),
            "extra": extra_state or {},
        }
        adapter = self._full_params() if self.lockstep else self.params
        return checkpoint.save(self.checkpoint_dir, step, adapter, state, keep=self.config.keep_checkpoints)

    def _resume(self, stateful: Stateful | None) -> int:
        directory, problems = checkpoint.latest_valid(self.checkpoint_dir)
        for problem in problems:  # a truncated or corrupted checkpoint: say so, use the one before it
            self.logger.log({"event": "skipped_checkpoint", "problem": problem})
            if self.is_main:
                print(f"metalora: skipping a damaged checkpoint: {problem}", file=sys.stderr, flush=True)
        if directory is None and problems:
            raise checkpoint.CheckpointError(
                f"no checkpoint under {self.checkpoint_dir} verifies ({problems[0]}); move the directory "
                "away to start the run over"
            )
        if directory is None:
            return 0
        adapter, state, rng = checkpoint.load(directory)
        try:  # the same tensor names, each of its parameter's shape and a floating dtype
            check_adapter_tensors(directory / checkpoint.ADAPTER_FILE, adapter, self.params)
        except AdapterLoadError as exc:
            raise checkpoint.CheckpointError(f"{directory} does not fit this run's adapter: {exc}") from None
        sharding.load_full_(self.params, adapter)  # a sharded tensor takes its shard of the full one
        self._start_zero()  # ZeRO: DeepSpeed partitions the restored adapter
        if self.zero is not None:
            self.zero.load_optimizer_state(
                self.params, state["optimizer"], lambda: self.backward([empty_batch()])
            )
        else:
            self.optimizer.load_state_dict(sharding.shard_optimizer_state(self.optimizer, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.counters = Counters.from_dict(state["counters"])
        if stateful is not None:
            if state.get("sampler") is None:
                raise checkpoint.CheckpointError(
                    f"{directory} has no sampler state to resume the data order from"
                )
            stateful.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(rng)
        self.logger.truncate_after(int(state["step"]))
        self.logger.log({"event": "resumed", "from_checkpoint": directory.name, "step": int(state["step"])})
        return int(state["step"])


def empty_batch() -> dict[str, Any]:
    """A one-token batch with no label token: a forward/backward that adds nothing to any gradient (FSDP needs
    every rank to run as many as the others)."""
    one = torch.zeros((1, 1), dtype=torch.long)
    return {
        "input_ids": one,
        "attention_mask": torch.ones_like(one),
        "labels": torch.full_like(one, -100),
        "task_ids": torch.zeros(1, dtype=torch.long),
        "sample_ids": [],
    }


def chunks(items: Sequence[Any], size: int | None) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items (all of them when size is None)."""
    if not size or size >= len(items):
        yield items
        return
    for i in range(0, len(items), size):
        yield items[i : i + size]
