"""``benchmarks/gpu.py`` sections (c) reweighting peak memory against a LoRA step and (f) the largest batch that
fits (plain, gradient checkpointing, NF4)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import metalora as ml
from gpubench.base import (
    ATTENTION_AND_MLP,
    GOALS,
    QKVO,
    SEARCH_TOLERANCE,
    Bench,
    Made,
    Setup,
    StepFactory,
    adapted,
    build_base,
    error_text,
    free_memory,
    random_features,
    resident_bytes,
    share_deadline,
    timed_rounds,
    token_batch,
)
from gpubench.training import isolated_memory, ratio_rows
from metalora.adapters.api import config_from_dict
from metalora.data import collate
from metalora.train.loss import forward_losses
from metalora.train.reweight import ReweightConfig, Reweighting, resolve_scheme

# --- (c) reweighting memory ------------------------------------------------------------------------------


PAPER_TABLE3 = {"batch": 4, "r": 32, "targets": ATTENTION_AND_MLP}
"""The META paper's Table 3 setting (§4.1): batch 4 (and a validation batch of 4), r=32 on attention and MLP."""


def reweight_factories(bench: Bench, model: nn.Module, n: int) -> dict[str, StepFactory]:
    """Makers of a plain LoRA step (mean of per-sample losses) and of a reweighting step (``Reweighting``:
    validation pass, training pass, Eq. 8, fused update) on the same batch of ``n`` samples of ``model``, each
    with its own AdamW."""
    batch = collate(random_features(bench, n, 0, seed=0), 0)
    vbatch = collate(random_features(bench, n, 0, seed=1), 0)
    params = list(ml.adapter_parameters(model).values())

    def context(_: dict[str, Any]) -> contextlib.AbstractContextManager:
        return bench.autocast()

    def plain() -> Made:
        opt = torch.optim.AdamW(params, lr=1e-6)

        def step() -> None:
            with bench.autocast():
                losses, _ = forward_losses(model, batch)
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, model, opt

    def reweight() -> Made:
        opt = torch.optim.AdamW(params, lr=1e-6)
        reweighting = Reweighting(model, ReweightConfig.from_dict({"batch_size": n}))

        def step() -> None:
            val = reweighting.validation_stats(vbatch, n, context)
            reweighting.gradient(batch, val, n, context)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, model, opt

    return {"lora": plain, "reweight": reweight}


def reweight_rows(bench: Bench, deadline: float, batch: int, r: int, targets: list[str]) -> dict[str, Any]:
    """Memory and time of a reweighting step against a LoRA step, at one batch size, rank and set of layers."""
    model = adapted(bench, "lora", r=r, targets=targets)
    model.train()
    makers = reweight_factories(bench, model, batch)
    memory = {k: isolated_memory(bench, make) for k, make in makers.items()}
    steps = {k: make()[0] for k, make in makers.items()}
    times, rounds = timed_rounds(steps, bench, deadline, "c", "steps")
    return {
        "batch": batch,
        "val_batch": batch,
        "r": r,
        "targets": targets,
        "scheme": resolve_scheme(model, ReweightConfig.from_dict({"batch_size": batch})),
        "repeats": rounds,
        "rows": ratio_rows("step", list(makers), times, memory),
    }


def section_c(bench: Bench, deadline: float) -> dict[str, Any]:
    """Ours (the setup's batch, r, q,k,v,o) and the paper's Table 3 setting (``PAPER_TABLE3``), half the time each."""
    setup = bench.setup
    ours = reweight_rows(bench, share_deadline(deadline, 2), setup.batch, setup.r, QKVO)
    free_memory(setup)
    paper = reweight_rows(bench, deadline, **PAPER_TABLE3)
    return {
        **ours,
        "seq": setup.seq,
        "paper_table3": "+2-4%",
        "goal": GOALS["reweight_peak_ratio"],
        "memory_kind": bench.memory_kind(),
        "paper_setting": paper,
    }


# --- (f) the largest batch -------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """``largest``: the largest batch seen to fit (0: none); ``failing``: the smallest seen to fail (None:
    none failed up to ``max_batch``); ``capped``: the time ran out before the bracket closed."""

    largest: int
    failing: int | None
    trials: list[tuple[int, bool]] = field(default_factory=list)
    capped: bool = False


def largest_batch(
    fits: Callable[[int], bool],
    start: int = 1,
    *,
    growth: float = 2.0,
    max_batch: int = 4096,
    tolerance: float = 0.0,
    deadline: float = math.inf,
    cost: Callable[[int], float] = lambda batch: 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Grow by ``growth`` (doubling) from ``start`` until a batch fails (or shrink until one fits), then
    bisect until the bracket is at most ``max(1, tolerance·largest)`` wide. After the first trial, none
    begins that ``cost`` (its expected seconds) says would end after ``deadline``. ``fits`` must be
    monotone: a batch that fits means every smaller one fits."""
    res = SearchResult(largest=0, failing=None)

    def trial(b: int) -> bool | None:
        if res.trials and clock() + cost(b) > deadline:
            res.capped = True
            return None
        ok = fits(b)
        res.trials.append((b, ok))
        if ok:
            res.largest = max(res.largest, b)
        else:
            res.failing = b if res.failing is None else min(res.failing, b)
        return ok

    b = max(1, min(start, max_batch))
    ok = trial(b)
    while ok and b < max_batch:
        b = min(max_batch, max(b + 1, int(b * growth)))
        ok = trial(b)
    while ok is False and b > 1 and res.largest == 0:
        b = max(1, int(b / growth))
        ok = trial(b)
    while (
        ok is not None
        and res.failing is not None
        and res.failing - res.largest > max(1, tolerance * res.largest)
    ):
        ok = trial((res.largest + res.failing) // 2)
    return res


def quantize_nf4_(model: nn.Module, setup: Setup) -> int:
    """Replace every decoder ``nn.Linear`` by a ``bitsandbytes`` NF4 ``Linear4bit`` holding its weight
    (quantized as it is moved to the device); the LM head stays as it is, as in QLoRA. Returns the count."""
    import bitsandbytes as bnb  # optional: (f)'s NF4 row records the error where it is missing

    compute = torch.bfloat16 if setup.dtype == torch.bfloat16 else torch.float32
    count = 0
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=False,
                compute_dtype=compute,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            setattr(parent, name, q.to(setup.device))
            count += 1
    return count


def checkpointed(model: nn.Module) -> nn.Module:
    """HF's gradient checkpointing, non-reentrant (the engine's ``train.gradient_checkpointing`` to come)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_model(bench: Bench, nf4: bool) -> nn.Module:
    """A fresh random base (NF4-quantized if asked) with metalora's LoRA, r 16 on q,k,v,o."""
    base = build_base(bench.setup)
    if nf4:
        quantize_nf4_(base, bench.setup)
    r = bench.setup.r
    ml.add_adapter(base, config_from_dict("lora", {"r": r, "alpha": 2 * r, "target_modules": QKVO}), seed=0)
    return base.train()


class StepProbe:
    """``probe(batch)``: the step growth of one LoRA train step at ``batch`` × seq, or None on CUDA
    out-of-memory (gradients dropped and the cache emptied); ``seconds_per_sample`` from the last step
    that ran to the end."""

    def __init__(self, bench: Bench, model: nn.Module) -> None:
        self.bench, self.model = bench, model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self.seconds_per_sample = 0.0

    def _step(self, x: torch.Tensor) -> None:
        with self.bench.autocast():
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self, batch: int) -> int | None:
        x = token_batch(self.bench, batch)
        t0 = self.bench.now()
        try:
            growth = self.bench.step_growth(lambda: self._step(x))
            self.seconds_per_sample = (self.bench.now() - t0) / batch
            return growth
        except torch.cuda.OutOfMemoryError:
            pass  # clean up outside the handler: its traceback holds the step's tensors
        self.opt.zero_grad(set_to_none=True)
        free_memory(self.bench.setup)
        return None


def search_variant(bench: Bench, model: nn.Module, deadline: float) -> dict[str, Any]:
    """Predict the largest batch from the growth at batches 1 and 2, then ``largest_batch`` from 0.9 of it.
    The limit: CUDA's out-of-memory (the device's whole memory); CPU: resident + saved ≤ --cpu-limit-mib."""
    setup = bench.setup
    probe = StepProbe(bench, model)
    g1, g2 = probe(1), probe(2)
    if g1 is None or g2 is None:
        return {
            "largest_batch": 0,
            "first_failing_batch": 1 if g1 is None else 2,
            "capped": False,
            "trials": [],
        }
    resident = resident_bytes(model, probe.opt)
    limit = torch.cuda.mem_get_info(bench.device)[1] if setup.cuda else setup.cpu_limit_bytes
    per_sample = max(g2 - g1, 1)
    predicted = max(1, int((limit - resident - (g1 - per_sample)) // per_sample))

    def fits(batch: int) -> bool:
        growth = probe(batch)
        return growth is not None and (setup.cuda or resident + growth <= limit)

    t0 = time.monotonic()
    res = largest_batch(
        fits,
        int(0.9 * predicted),
        max_batch=setup.max_batch,
        tolerance=SEARCH_TOLERANCE,
        deadline=deadline,
        cost=lambda b: b * probe.seconds_per_sample,
    )
    if res.capped:
        bench.budget.skip("f", "search", f"bracket [{res.largest}, {res.failing}) left open: time share used")
    return {
        "largest_batch": res.largest,
        "first_failing_batch": res.failing,
        "capped": res.capped,
        "trials": [list(t) for t in res.trials],
        "predicted": predicted,
        "per_sample_bytes": per_sample,
        "resident_bytes": resident,
        "limit_bytes": limit,
        "search_s": time.monotonic() - t0,
    }


def section_f(bench: Bench, deadline: float) -> dict[str, Any]:
    bench.release_base()  # only the searched model may be on the device
    variants = ["plain", "grad_ckpt", "nf4"]
    rows, model = [], None
    for i, variant in enumerate(variants):
        part = share_deadline(deadline, len(variants) - i)
        try:
            if variant == "grad_ckpt" and model is not None:
                model = checkpointed(model)  # the plain model, checkpointed
            else:
                model = None  # let the previous model go before the next is built
                free_memory(bench.setup)
                model = lora_model(bench, nf4=variant == "nf4")
                model = checkpointed(model) if variant == "grad_ckpt" else model
            rows.append({"variant": variant, "error": None, **search_variant(bench, model, part)})
        except Exception as exc:  # noqa: BLE001 - one variant (bitsandbytes missing, say) must not stop the rest
            rows.append({"variant": variant, "error": error_text(exc)})
            model = None
        free_memory(bench.setup)
    return {
        "seq": bench.setup.seq,
        "memory_kind": bench.memory_kind(),
        "growth": 2.0,
        "tolerance": SEARCH_TOLERANCE,
        "rows": rows,
    }
