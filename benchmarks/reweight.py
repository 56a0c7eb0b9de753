"""META-LoRA reweighting with real built-in data: memory, step time, noisy labels, Table 2.

On SmolLM2-135M, or the model named by ``--model`` (an embedded name, HF name or path).

    python benchmarks/reweight.py [--parts a,b,c,probe,d] [--seeds 0,1]

(a) peak memory of one reweighting step over one plain LoRA step, same training batch (each in a fresh
    subprocess, peak RSS reset right before the measured step, after one warm-up step of the same kind);
(b) step time, interleaved medians in one process: plain LoRA on T; the floor — plain LoRA on T plus a
    forward/backward of V, the work any scheme must do; reweighting with the one-backward ``fused``
    scheme and with the published ``two_backward`` scheme; plus the agreement of the low-rank (L) and
    dense (D) scores with the ``exact`` per-sample-gradient scores on one batch;
(c) noisy labels: 30% of a real task's training answers replaced by a wrong option (``--c-task``, sciq by
    default; sst2 flips the label); AUC with which each sample's mean learned weight separates clean from
    corrupted, and held-out accuracy vs plain LoRA; ``--c-warm-steps`` starts both from an adapter
    trained on clean, disjoint examples;
(probe) the best case of the score on the (c) data: exact per-sample gradients against the mean gradient
    of the whole validation set at checkpoints of plain training; AUC of the dot product, its cosine and
    the loss, and how well the dot product separates the *given* labels of a binary task; the same
    gradients scored against our validation directions (``--val-balance``, ``--shared-direction`` in (c));
(d) a small Table-2 analogue: a mixed pool of four tasks, validation on the target's dev split, test on
    its test split (``--d-target``, ARC-Easy by default; ``--d-pool``); plain LoRA on the pool,
    reweighting, and the selection baselines (BM25, DSIR, classifier, MIX).

The settings in ``docs/benchmarks.md`` were run with, besides the defaults:
    --parts c --c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40 --c-epochs 2
    --parts probe --c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40
    --parts d --d-target sst2 --d-pool sst2,siqa,piqa,boolq --d-per-task 40 --d-k 40 --d-steps 20 --lr 5e-4
        --d-mc-style text

    (c) and the probe again with --model gemma3-270m (keys get the model's name)
    (c) with our validation-direction options: the first line plus --c-val-batch 8 (and 32) --score cosine
        --val-balance answer --shared-direction remove; its control: --c-val-batch 8 alone

Scale (2 shared CPU cores): LoRA r=16 on q,k,v,o, sequences ≤ 128 tokens, tens of steps. Prints tables,
writes ``benchmarks/results/reweight.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    current_rss_bytes,
    interleaved_medians,
    machine,
    peak_rss_bytes,
    reset_peak_rss,
    run_in_fresh_process,
    save,
    table,
)

MODEL_ENV = "METALORA_BENCH_MODEL"  # --model sets it, so the fresh processes of (a) load the same model
MODEL = os.environ.get(MODEL_ENV, "smollm2-135m")
MAX_LEN = 128  # (a), (b); (c) and (d) train at TRAIN_MAX_LEN
TRAIN_MAX_LEN = 64
EVAL_MAX_LEN = 160  # (d) scores ARC-Easy options with the whole question (forward only)
R = 16
TRAIN_BATCH = 8
VAL_BATCH = 1  # 8:1, the closest to the default 10:1 at this batch


# --- shared setup ---------------------------------------------------------------------------------------


def load_model(seed: int = 0):
    import metalora as ml
    from metalora.models import load_base

    torch.manual_seed(seed)
    model, tok = load_base(MODEL)
    ml.add_adapter(
        model, ml.LoRAConfig(r=R, alpha=2 * R, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    return model, tok


def nudge_b(model, scale: float = 1e-3, seed: int = 0) -> None:
    """Non-zero up-projections, as after a few steps (at B = 0 the low-rank scores are all zero)."""
    from metalora.adapters import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter_parameters(model).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def features(tok, examples, task_to_id=None, max_length: int = MAX_LEN):
    from metalora.data import tokenize_examples

    feats, _ = tokenize_examples(examples, tok, task_to_id, max_length=max_length)
    return feats


def real_batches(tok, n_train: int = TRAIN_BATCH, n_val: int = VAL_BATCH):
    from metalora.data import load_task

    task = load_task("sciq")
    return features(tok, task.train[:n_train]), features(tok, task.dev[:n_val])


def plain_step_fn(model, train_feats, pad: int, val_feats=None):
    """A plain LoRA step (mean of per-sample losses; with ``val_feats`` also a forward/backward of V: the floor)."""
    from metalora.adapters import adapter_parameters
    from metalora.data import collate
    from metalora.train.reweight import forward_losses

    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-6)
    batch = collate(train_feats, pad)
    vbatch = collate(val_feats, pad) if val_feats else None

    def step() -> None:
        if vbatch is not None:
            losses, _ = forward_losses(model, vbatch)
            torch.autograd.grad(losses.sum(), params)
        losses, _ = forward_losses(model, batch)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def reweight_step_fn(model, train_feats, val_feats, pad: int, **config):
    from metalora.adapters import adapter_parameters
    from metalora.data import collate
    from metalora.train.reweight import ReweightConfig, reweighted_gradient, validation_stats

    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-6)
    cfg = ReweightConfig(**config)
    batch, vbatch = collate(train_feats, pad), collate(val_feats, pad)

    def step() -> None:
        val = validation_stats(model, vbatch, cfg, len(val_feats))
        reweighted_gradient(model, batch, val, cfg, len(train_feats))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cpu_time_medians(fns: dict[str, Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median *process CPU* seconds per call, round-robin (``common.interleaved_medians`` on CPU time)."""
    return interleaved_medians(fns, repeats, warmup=warmup, clock=time.process_time)


# --- (a) memory -----------------------------------------------------------------------------------------


def memory_probe(kind: str) -> dict[str, int]:
    """In a fresh process: peak RSS of one step of ``kind`` after one warm-up step of the same kind (one
    thread: the same for every kind, and no OpenMP stalls when the machine is shared)."""
    torch.set_num_threads(1)
    model, tok = load_model()
    nudge_b(model)
    model.train()
    train, val = real_batches(tok)
    pad = tok.pad_token_id
    if kind == "plain":
        step = plain_step_fn(model, train, pad)
    else:
        step = reweight_step_fn(model, train, val, pad, scheme=kind)
    step()  # warm-up: optimizer state, allocator pools
    gc.collect()
    reset_peak_rss()
    before = current_rss_bytes()
    step()
    peak = peak_rss_bytes()
    return {"peak_rss_bytes": peak, "rss_before_bytes": before, "peak_growth_bytes": peak - before}


MALLOC_SETTINGS = {
    "glibc_default": {},
    # large blocks mmapped and unmapped on free: RSS follows live memory instead of the heap's high water
    "mmap_threshold_128KiB": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
}


def part_a() -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for setting, env in MALLOC_SETTINGS.items():
        out[setting] = {}
        for kind in ("plain", "fused", "two_backward"):
            out[setting][kind] = run_in_fresh_process("reweight", "memory_probe", kind, env=env)
        base = out[setting]["plain"]
        rows += [
            {
                "allocator": setting,
                "step": k,
                "peak_rss_MiB": v["peak_rss_bytes"] / 2**20,
                "peak_ratio_vs_plain": v["peak_rss_bytes"] / base["peak_rss_bytes"],
                "step_growth_MiB": v["peak_growth_bytes"] / 2**20,
                "growth_ratio_vs_plain": v["peak_growth_bytes"] / max(base["peak_growth_bytes"], 1),
            }
            for k, v in out[setting].items()
        ]
    print(
        f"\n(a) peak memory, batch {TRAIN_BATCH}+{VAL_BATCH} val, ≤{MAX_LEN} tokens, r={R} q,k,v,o "
        "(fresh process each; peak RSS reset after one warm-up step)"
    )
    print(table(rows, list(rows[0])))
    return {"probes": out, "rows": rows}


# --- (b) step time and agreement with exact --------------------------------------------------------------


def part_b(repeats: int) -> dict[str, Any]:
    from metalora.data import collate
    from metalora.train.reweight import ReweightConfig, reweighted_gradient, validation_stats

    torch.set_num_threads(1)
    model, tok = load_model()
    nudge_b(model)
    model.train()
    train, val = real_batches(tok)
    pad = tok.pad_token_id
    fns = {
        "plain_T": plain_step_fn(model, train, pad),
        "floor_T+V": plain_step_fn(model, train, pad, val_feats=val),
        "reweight_fused": reweight_step_fn(model, train, val, pad, scheme="fused"),
        "reweight_two_backward": reweight_step_fn(model, train, val, pad, scheme="two_backward"),
    }
    wall = interleaved_medians(
        {"plain_T": fns["plain_T"], "reweight_fused": fns["reweight_fused"]}, 1, warmup=0
    )
    times = cpu_time_medians(fns, repeats)
    rows = [
        {
            "step": k,
            "median_s": v,
            "ratio_vs_plain_T": v / times["plain_T"],
            "ratio_vs_floor": v / times["floor_T+V"],
        }
        for k, v in times.items()
    ]
    print(
        f"\n(b) step CPU time (1 thread), interleaved medians of {repeats} (train {TRAIN_BATCH}, val {VAL_BATCH}, "
        f"≤{MAX_LEN} tokens)"
    )
    print(table(rows, list(rows[0])))
    # agreement of L and D with exact per-sample gradient inner products, one batch of 16 (val 4)
    from scipy.stats import pearsonr, spearmanr

    from metalora.data import load_task

    task = load_task("sciq")
    tr, va = features(tok, task.train[100:108]), features(tok, task.dev[10:12])
    scores = {}
    for similarity in ("exact", "low_rank", "dense"):
        cfg = ReweightConfig(similarity=similarity)
        v = validation_stats(model, collate(va, pad), cfg, len(va))
        scores[similarity] = reweighted_gradient(model, collate(tr, pad), v, cfg, len(tr)).scores.numpy()
        model.zero_grad(set_to_none=True)
    agree = []
    for similarity in ("low_rank", "dense"):
        a, e = scores[similarity], scores["exact"]
        agree.append(
            {
                "similarity": similarity,
                "spearman_vs_exact": float(spearmanr(a, e).statistic),
                "pearson_vs_exact": float(pearsonr(a, e).statistic),
                "sign_agreement": float(np.mean(np.sign(a) == np.sign(e))),
            }
        )
    print(
        "\n(b') score agreement with exact per-sample gradient inner products (8 train, 2 val, B nudged to 1e-3)"
    )
    print(table(agree, list(agree[0])))
    return {
        "cpu_seconds": times,
        "wall_seconds_one_round": wall,
        "rows": rows,
        "agreement": agree,
        "scores": {k: v.tolist() for k, v in scores.items()},
    }


# --- training helpers for (c) and (d) --------------------------------------------------------------------


def train_plain(model, feats, steps: int, lr: float, seed: int, run_dir: Path, pad: int) -> None:
    from metalora.train import EngineConfig, MultitaskConfig, train_multitask

    train_multitask(
        model,
        feats,
        MultitaskConfig(batch_size=TRAIN_BATCH, seed=seed),
        EngineConfig(max_steps=steps, lr=lr, device="cpu", seed=seed, progress=False),
        run_dir,
        pad,
    )


def train_rw(
    model, feats, val_feats, steps: int, lr: float, seed: int, run_dir: Path, pad: int, **config
) -> None:
    from metalora.train import EngineConfig
    from metalora.train.reweight import ReweightConfig, train_reweight

    cfg = ReweightConfig(batch_size=TRAIN_BATCH, seed=seed, **config)
    train_reweight(
        model,
        feats,
        val_feats,
        cfg,
        EngineConfig(max_steps=steps, lr=lr, device="cpu", seed=seed, progress=False),
        run_dir,
        pad,
    )


@torch.no_grad()
def mc_accuracy(
    model, tok, examples, batch: int = 16, max_length: int = TRAIN_MAX_LEN, style: str = "letter_text"
) -> float:
    """Accuracy of argmax_j Σ log p(response_j | prompt) over the options formatted in ``style`` (default
    letter + text); for cloze (``text``) the sum is divided by the option's token count (length-normalised)."""
    from metalora.data import Example, collate
    from metalora.data.templates import format_mc_response
    from metalora.train.reweight import forward_losses

    model.eval()
    items = []
    for ex in examples:
        for j in range(len(ex.options)):
            items.append(
                Example(
                    prompt=ex.prompt,
                    response=format_mc_response(ex.options, j, style),
                    task=ex.task,
                    id=f"{ex.id}#{j}",
                )
            )
    feats = features(tok, items, max_length=max_length)
    n_tok = [sum(1 for t in f["labels"][1:] if t != -100) for f in feats]
    scores = []
    for i in range(0, len(feats), batch):
        losses, _ = forward_losses(model, collate(feats[i : i + batch], tok.pad_token_id))
        scale = (lambda n: 1.0) if style == "text" else (lambda n: n)
        scores += [-float(loss) * scale(n) for loss, n in zip(losses, n_tok[i : i + batch], strict=True)]
    k, correct = 0, 0
    for ex in examples:
        m = len(ex.options)
        correct += int(int(np.argmax(scores[k : k + m])) == ex.answer)
        k += m
    model.train()
    return correct / len(examples)


# --- (c) noisy labels ----------------------------------------------------------------------------------


def corrupt(examples, fraction: float, seed: int, style: str = "letter_text"):
    """Replace the answer of ``fraction`` of the examples by a random wrong option; returns (examples, is_corrupt)."""
    from dataclasses import replace

    from metalora.data.templates import format_mc_response

    rng = random.Random(seed)
    bad = set(rng.sample(range(len(examples)), int(round(fraction * len(examples)))))
    out = []
    for i, ex in enumerate(examples):
        if i in bad:
            wrong = rng.choice([j for j in range(len(ex.options)) if j != ex.answer])
            ex = replace(ex, response=format_mc_response(ex.options, wrong, style), answer=wrong)
        out.append(ex)
    return out, [i in bad for i in range(len(examples))]


def warm_start(model, tok, task, n_train: int, steps: int, lr: float, seed: int, style: str) -> float:
    """Train ``model``'s adapter in place (plain LoRA, ``steps`` steps at ``lr``) on clean training examples
    disjoint from the first ``n_train`` (the noisy ones); its held-out accuracy. One function for (c) and
    the probe, so at one seed both start from the same adapter."""
    clean = task.train[n_train : n_train + steps * TRAIN_BATCH]
    with tempfile.TemporaryDirectory() as d:
        feats = features(tok, clean, max_length=TRAIN_MAX_LEN)
        train_plain(model, feats, steps, lr, seed, Path(d), tok.pad_token_id)
    acc = mc_accuracy(model, tok, task.test, style=style)
    print({"seed": seed, "warm_start_acc": acc, "clean_examples": len(clean)}, flush=True)
    return acc


def part_c(
    seeds: list[int],
    n_train: int,
    steps: int,
    lr: float,
    style: str = "letter_text",
    similarity: str = "low_rank",
    epochs: int = 1,
    score: str = "dot",
    task_name: str = "sciq",
    val_batch: int = 2,
    warm_steps: int = 0,
    warm_lr: float = 5e-4,
    val_balance: str = "none",
    shared_direction: str = "keep",
) -> dict[str, Any]:
    """``style``: how answers are written (``letter_text`` " B. <option>", or cloze ``text`` " <option>", where
    the whole loss sits on the answer's content and accuracy is length-normalised); ``similarity``: the
    reweighting score (``exact`` = true per-sample gradient inner products, the reference); ``epochs``: passes
    over the ``n_train`` samples (``steps`` per pass); with more than one, the AUC is also reported from the
    weights of the later passes only, when the adapter has learned from the clean majority. ``warm_steps``:
    both methods start from one adapter first trained (plain LoRA, ``warm_lr``) for that many steps on
    clean training examples disjoint from the noisy ones, a stand-in for a model that already knows the
    task (the premise of gradient-agreement reweighting: the validation gradient carries the task).
    ``val_balance``, ``shared_direction``: our validation-direction options (``metalora.train.val_direction``)."""
    from metalora.adapters import adapter_parameters
    from metalora.data import TaskSpec, load_task
    from metalora.eval.metrics import auc_roc
    from metalora.train.reweight import mean_sample_weights, read_weight_log

    torch.set_num_threads(1)
    task = load_task(TaskSpec(name=task_name, mc_response=style))
    results = []
    for seed in seeds:
        train_ex, is_bad = corrupt(task.train[:n_train], 0.3, seed, style)
        runs = {}
        warm_state, warm_acc = None, None
        if warm_steps:
            model, tok = load_model(seed)
            warm_acc = warm_start(model, tok, task, n_train, warm_steps, warm_lr, seed, style)
            warm_state = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
        for method in ("plain", "reweight"):
            model, tok = load_model(seed)
            if warm_state is not None:
                with torch.no_grad():
                    for n, p in adapter_parameters(model).items():
                        p.copy_(warm_state[n])
            feats = features(tok, train_ex, max_length=TRAIN_MAX_LEN)
            val = features(tok, task.dev[:32], max_length=TRAIN_MAX_LEN)
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                if method == "plain":
                    train_plain(model, feats, steps * epochs, lr, seed, Path(d), tok.pad_token_id)
                else:
                    train_rw(
                        model,
                        feats,
                        val,
                        steps * epochs,
                        lr,
                        seed,
                        Path(d),
                        tok.pad_token_id,
                        val_batch_size=val_batch,
                        similarity=similarity,
                        score=score,
                        val_balance=val_balance,
                        shared_direction=shared_direction,
                    )
                    records = read_weight_log(d)
                    weights = mean_sample_weights(records)
                    late = mean_sample_weights([r for r in records if r["step"] > steps])
                seconds = time.perf_counter() - t0
            runs[method] = {"test_acc": mc_accuracy(model, tok, task.test, style=style), "train_s": seconds}
        ids = [f["sample_id"] for f in feats]
        seen = [i for i, s in enumerate(ids) if s in weights]
        labels = [0 if is_bad[i] else 1 for i in seen]  # clean = positive
        relative = [weights[ids[i]]["mean_relative_weight"] for i in seen]
        clean_w = float(np.mean([s for s, y in zip(relative, labels, strict=True) if y]))
        bad_w = float(np.mean([s for s, y in zip(relative, labels, strict=True) if not y]))
        late_seen = [i for i in seen if ids[i] in late]
        auc_late = (
            auc_roc(
                [labels[seen.index(i)] for i in late_seen],
                [late[ids[i]]["mean_relative_weight"] for i in late_seen],
            )
            if epochs > 1
            else None
        )
        results.append(
            {
                "seed": seed,
                "auc_clean_vs_corrupt": auc_roc(labels, relative),
                "auc_after_epoch_1": auc_late,
                "acc_warm_start": warm_acc,
                "samples_scored": len(seen),
                "mean_Bw_clean": clean_w,
                "mean_Bw_corrupt": bad_w,
                "acc_plain": runs["plain"]["test_acc"],
                "acc_reweight": runs["reweight"]["test_acc"],
                "train_s_plain": runs["plain"]["train_s"],
                "train_s_reweight": runs["reweight"]["train_s"],
            }
        )
        print(results[-1], flush=True)
    print(
        f"\n(c) noisy labels: {task_name}, {n_train} train (30% wrong answers), 32 clean dev for validation "
        f"({val_batch} per step), {steps * epochs} steps of {TRAIN_BATCH} ({epochs} epochs), lr {lr}, "
        f"test = {task_name} test ({len(task.test)})"
    )
    print(table(results, list(results[0])))
    return {
        "rows": results,
        "n_train": n_train,
        "steps": steps,
        "lr": lr,
        "mc_response": style,
        "similarity": similarity,
        "epochs": epochs,
        "score": score,
        "task": task_name,
        "val_batch": val_batch,
        "warm_steps": warm_steps,
        "warm_lr": warm_lr,
        "val_balance": val_balance,
        "shared_direction": shared_direction,
        "model": MODEL,
    }


def _plain_steps(model, opt: torch.optim.Optimizer, feats, steps: int, rng, pad: int) -> None:
    """``steps`` steps of ``opt`` (plain LoRA) on random batches of ``TRAIN_BATCH``."""
    from metalora.data import collate
    from metalora.train.reweight import forward_losses

    for _ in range(steps):
        batch = collate([feats[i] for i in rng.choice(len(feats), TRAIN_BATCH, replace=False)], pad)
        forward_losses(model, batch)[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _exact_sample_grads(model, feats, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, P] float64 per-sample adapter gradients, [N] losses) of ``feats``, a batch at a time."""
    from metalora.adapters import adapter_parameters
    from metalora.data import collate
    from metalora.train.reweight import forward_losses
    from metalora.train.similarity import PerSampleLoRAGrads

    names = list(adapter_parameters(model))
    grads = PerSampleLoRAGrads(model)
    out, losses_out = [], []
    for i in range(0, len(feats), TRAIN_BATCH):
        with grads.capture():
            losses, _ = forward_losses(model, collate(feats[i : i + TRAIN_BATCH], pad))
            losses.sum().backward()
        model.zero_grad(set_to_none=True)
        out.append(torch.cat([grads.grads[n].flatten(1).double() for n in names], 1))
        losses_out.append(losses.detach().double())
    return torch.cat(out), torch.cat(losses_out)


def label_separation(given: list[int], score: torch.Tensor) -> float:
    """AUC with which ``score`` tells the two *given* answers of a binary task apart, either way round."""
    from metalora.eval.metrics import auc_roc

    auc = auc_roc(given, score.tolist())
    return max(auc, 1 - auc)


def within_label_auc(clean: list[int], given: list[int], score: torch.Tensor) -> float:
    """Mean over the two *given* answers of a binary task of the clean-vs-corrupted AUC among the samples
    that carry that answer: the noise signal left once the label itself is held fixed."""
    from metalora.eval.metrics import auc_roc

    aucs = []
    for answer in (0, 1):
        rows = [i for i, g in enumerate(given) if g == answer]
        aucs.append(auc_roc([clean[i] for i in rows], score[rows].tolist()))
    return float(np.mean(aucs))


def directed_scores(
    g_train: torch.Tensor, g_val: torch.Tensor, groups: list[int], balance: str, shared: str
) -> torch.Tensor:
    """⟨∇ℓ_i, Σ_v β_v ∇ℓ_v⟩ with β from the library's ``validation_coefficients`` on exact gradients."""
    from metalora.train.val_direction import validation_coefficients

    return g_train @ (validation_coefficients(g_val @ g_val.T, groups, balance, shared) @ g_val)


def layer_normalized(model, g: torch.Tensor) -> torch.Tensor:
    """``_exact_sample_grads``' rows with each adapted layer divided by its norm (the library's
    ``layer_unit_rows``, the exact form of ``score="layer_cosine"``)."""
    from metalora.adapters import adapter_parameters
    from metalora.train.similarity import layer_parameter_names, layer_unit_rows

    params = adapter_parameters(model)
    by_name = dict(zip(params, g.split([p.numel() for p in params.values()], dim=1), strict=True))
    return layer_unit_rows(by_name, layer_parameter_names(model))


def part_c_probe(
    seeds: list[int],
    n_train: int,
    checkpoints: Sequence[int],
    lr: float,
    task_name: str,
    style: str = "text",
    warm_steps: int = 0,
    warm_lr: float = 5e-4,
) -> dict[str, Any]:
    """Is the label-noise signal in the gradients at all? Plain LoRA trains on the noisy set (batches of
    ``TRAIN_BATCH`` drawn at random; optionally after (c)'s warm start, the same adapter at the same seed);
    at each checkpoint the
    exact per-sample gradient ∇ℓ_i of every training sample (``PerSampleLoRAGrads``) is scored against the
    mean gradient of all 32 validation samples — the best case of the paper's score, with no low-rank
    approximation and no validation sub-batch — and the AUC (clean = positive) of that dot product, of its
    cosine, and of −ℓ_i (the small-loss criterion, for comparison) is reported with held-out accuracy,
    and so are the scores against our two validation directions (``metalora.train.val_direction``), alone
    and together, and ``score="layer_cosine"`` (each layer's gradient at unit norm) with the paper's and
    with both directions."""
    from metalora.adapters import adapter_parameters
    from metalora.data import TaskSpec, load_task
    from metalora.eval.metrics import auc_roc
    from metalora.train.val_direction import answer_groups

    torch.set_num_threads(1)
    task = load_task(TaskSpec(name=task_name, mc_response=style))
    rows = []
    for seed in seeds:
        train_ex, is_bad = corrupt(task.train[:n_train], 0.3, seed, style)
        labels = [0 if b else 1 for b in is_bad]
        is_clean = torch.tensor(labels, dtype=torch.bool)
        given = [int(ex.answer == 1) for ex in train_ex]
        n_options = max(len(ex.options) for ex in train_ex)
        model, tok = load_model(seed)
        pad = tok.pad_token_id
        rng = np.random.default_rng(seed)
        warm_acc = None
        if warm_steps:  # (c)'s warm start: at one seed, the same adapter as (c)'s
            warm_acc = warm_start(model, tok, task, n_train, warm_steps, warm_lr, seed, style)
        else:
            nudge_b(model, 1e-3, seed)  # B = 0 would make every adapter-A gradient zero at checkpoint 0
        # one optimizer for the whole run, so the checkpoints do not change the trajectory
        opt = torch.optim.AdamW(adapter_parameters(model).values(), lr=lr, weight_decay=0.0)
        feats = features(tok, train_ex, max_length=TRAIN_MAX_LEN)
        val = features(tok, task.dev[:32], max_length=TRAIN_MAX_LEN)
        val_groups = answer_groups(val)

        done = 0
        for checkpoint in checkpoints:
            _plain_steps(model, opt, feats, checkpoint - done, rng, pad)
            done = checkpoint
            g_train, loss_train = _exact_sample_grads(model, feats, pad)
            g_val, loss_val = _exact_sample_grads(model, val, pad)
            norms = g_train.norm(dim=1).clamp_min(1e-30)
            dot = g_train @ g_val.mean(0)
            cosine = dot / norms
            balanced = directed_scores(g_train, g_val, val_groups, "answer", "keep")
            unit_val = g_val / g_val.norm(dim=1, keepdim=True).clamp_min(1e-30)
            val_normalized = g_train @ unit_val.mean(0)
            pc_removed = directed_scores(g_train, g_val, val_groups, "none", "remove")
            both = directed_scores(g_train, g_val, val_groups, "answer", "remove")
            l_train, l_val = layer_normalized(model, g_train), layer_normalized(model, g_val)
            layer_cosine = l_train @ l_val.mean(0)
            layer_cosine_both = directed_scores(l_train, l_val, val_groups, "answer", "remove")

            rows.append(
                {
                    "seed": seed,
                    "step": checkpoint,
                    "acc_warm_start": warm_acc,
                    "test_acc": mc_accuracy(model, tok, task.test, style=style),
                    "train_loss": float(loss_train.mean()),
                    "val_loss": float(loss_val.mean()),
                    "auc_dot": auc_roc(labels, dot.tolist()),
                    "auc_cosine": auc_roc(labels, cosine.tolist()),
                    "auc_neg_loss": auc_roc(labels, (-loss_train).tolist()),
                    "auc_answer_balanced": auc_roc(labels, balanced.tolist()),
                    "auc_val_normalized": auc_roc(labels, val_normalized.tolist()),
                    "auc_answer_balanced_cosine": auc_roc(labels, (balanced / norms).tolist()),
                    "auc_pc_removed": auc_roc(labels, pc_removed.tolist()),
                    "auc_pc_removed_cosine": auc_roc(labels, (pc_removed / norms).tolist()),
                    "auc_both_cosine": auc_roc(labels, (both / norms).tolist()),
                    "auc_layer_cosine": auc_roc(labels, layer_cosine.tolist()),
                    "auc_layer_cosine_both": auc_roc(labels, layer_cosine_both.tolist()),
                    "label_separation_pc_removed": label_separation(given, pc_removed)
                    if n_options == 2
                    else None,
                    "label_separation_balanced": label_separation(given, balanced)
                    if n_options == 2
                    else None,
                    "label_separation_dot": label_separation(given, dot) if n_options == 2 else None,
                    "auc_dot_within_label": within_label_auc(labels, given, dot) if n_options == 2 else None,
                    "frac_dot_positive_clean": float((dot[is_clean] > 0).double().mean()),
                    "frac_dot_positive_corrupt": float((dot[~is_clean] > 0).double().mean()),
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\n(c) probe: {task_name}, {n_train} train (30% wrong answers), exact per-sample gradients vs the mean "
        f"of 32 clean dev gradients; plain LoRA lr {lr}"
        + (f" after {warm_steps} clean warm-start steps (lr {warm_lr})" if warm_steps else "")
    )
    print(table(rows, list(rows[0])))
    return {
        "rows": rows,
        "task": task_name,
        "n_train": n_train,
        "lr": lr,
        "warm_steps": warm_steps,
        "warm_lr": warm_lr,
        "mc_response": style,
        "model": MODEL,
    }


# --- (d) Table-2 analogue --------------------------------------------------------------------------------


def part_d(
    seeds: list[int],
    per_task: int,
    steps: int,
    lr: float,
    k: int,
    target_name: str = "arc_easy",
    pool_tasks: Sequence[str] = ("sciq", "piqa", "siqa", "boolq"),
    related: str = "sciq",
    style: str = "letter_text",
    val_batch: int = 2,
    methods: Sequence[str] = ("plain (pool)", "reweight", "bm25", "dsir", "classifier", "mix"),
) -> dict[str, Any]:
    """Train on a pool of ``per_task`` training examples of each of ``pool_tasks`` (drawn per seed), validate
    on 32 examples of ``target_name``'s dev split, test on its test split. ``related``: the pool task nearest
    the target, whose share of each method's training data (of the learned weight, for reweighting) is
    reported. Every method takes ``steps`` steps of ``TRAIN_BATCH``; a selection of k rows is repeated.
    Reweighting scores each step against ``val_batch`` validation samples."""
    from metalora.data import Example, TaskSpec, load_task
    from metalora.select import read_jsonl, select_jsonl, write_jsonl
    from metalora.train.reweight import mean_sample_weights, read_weight_log

    torch.set_num_threads(1)
    tasks = {name: load_task(TaskSpec(name=name, mc_response=style)) for name in pool_tasks}
    target = load_task(TaskSpec(name=target_name, mc_response=style))
    val_ex, test_ex = target.dev[:32], target.test

    def accuracy(model, tok) -> float:
        return mc_accuracy(model, tok, test_ex, max_length=EVAL_MAX_LEN, style=style)

    def rows_of(examples) -> list[dict[str, str]]:
        return [{"prompt": e.prompt, "response": e.response, "id": e.id, "task": e.task} for e in examples]

    base_model, tok = load_model(0)
    zero_shot = accuracy(base_model, tok)
    print({"base model (no training)": zero_shot}, flush=True)
    del base_model
    rows = []
    for seed in seeds:
        rng = random.Random(seed)
        pool = [ex for name in pool_tasks for ex in rng.sample(tasks[name].train, per_task)]
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            write_jsonl(rows_of(pool), d / "pool.jsonl")
            write_jsonl(rows_of(val_ex), d / "val.jsonl")
            train_sets: dict[str, list] = {"plain (pool)": pool, "reweight": pool}
            for method in [m for m in ("bm25", "dsir", "classifier", "mix") if m in methods]:
                kw = {"ratio": 10.0} if method == "mix" else {"k": k}
                select_jsonl(
                    method, d / "pool.jsonl", d / "val.jsonl", d / f"{method}.jsonl", seed=seed, **kw
                )
                train_sets[method] = [
                    Example(
                        prompt=r["prompt"],
                        response=r["response"],
                        task=r.get("task", "x"),
                        id=str(r.get("id", i)),
                    )
                    for i, r in enumerate(read_jsonl(d / f"{method}.jsonl"))
                ]
            for method, examples in train_sets.items():
                if method not in methods:
                    continue
                model, tok = load_model(seed)
                feats = features(tok, examples, max_length=TRAIN_MAX_LEN)
                t0 = time.perf_counter()
                if method == "reweight":
                    train_rw(
                        model,
                        feats,
                        features(tok, val_ex, max_length=TRAIN_MAX_LEN),
                        steps,
                        lr,
                        seed,
                        d / "rw",
                        tok.pad_token_id,
                        val_batch_size=val_batch,
                    )
                    weights = mean_sample_weights(read_weight_log(d / "rw"))
                    task_of = {f["sample_id"]: e.task for f, e in zip(feats, examples, strict=True)}
                    mass = {i: v["mean_relative_weight"] * v["times_drawn"] for i, v in weights.items()}
                    share = sum(v for i, v in mass.items() if task_of[i] == related) / sum(mass.values())
                else:
                    train_plain(model, feats, steps, lr, seed, d / method.split()[0], tok.pad_token_id)
                    share = sum(1 for e in examples if str(e.task) == related) / len(examples)
                row = {
                    "seed": seed,
                    "method": method,
                    "train_size": len(feats),
                    "test_acc": accuracy(model, tok),
                    f"share_{related}": share,
                    "train_s": time.perf_counter() - t0,
                }
                rows.append(row)
                print(row, flush=True)
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        accs = [r["test_acc"] for r in rows if r["method"] == method]
        shares = [r[f"share_{related}"] for r in rows if r["method"] == method]
        summary.append(
            {
                "method": method,
                "mean_acc": float(np.mean(accs)),
                "std_acc": float(np.std(accs)),
                f"share_{related}": float(np.mean(shares)),
                "seeds": len(accs),
            }
        )
    summary.append(
        {
            "method": "base model (no training)",
            "mean_acc": zero_shot,
            "std_acc": 0.0,
            f"share_{related}": None,
            "seeds": 1,
        }
    )
    print(
        f"\n(d) Table-2 analogue: pool = {per_task} train each of {list(pool_tasks)}; validation = 32 "
        f"{target_name} dev; test = {target_name} test ({len(test_ex)}); {steps} steps of {TRAIN_BATCH}, "
        f"lr {lr}; selection keeps k={k}; answers as {style}"
    )
    print(table(summary, list(summary[0])))
    return {
        "rows": rows,
        "summary": summary,
        "target": target_name,
        "pool_tasks": list(pool_tasks),
        "related": related,
        "per_task": per_task,
        "steps": steps,
        "lr": lr,
        "k": k,
        "mc_response": style,
        "val_batch": val_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--d-steps", type=int, default=10)
    parser.add_argument("--d-target", default="arc_easy", help="(d): validation (dev) and test task")
    parser.add_argument("--d-pool", default="sciq,piqa,siqa,boolq", help="(d): the training pool's tasks")
    parser.add_argument(
        "--d-related", default=None, help="(d): pool task nearest the target (default: first)"
    )
    parser.add_argument("--d-per-task", type=int, default=20, help="(d): pool examples per task")
    parser.add_argument("--d-k", type=int, default=24, help="(d): rows kept by BM25, DSIR, classifier")
    parser.add_argument("--d-lr", type=float, default=None, help="(d): learning rate (default --lr)")
    parser.add_argument("--d-val-batch", type=int, default=2, help="(d): validation samples per step")
    parser.add_argument(
        "--d-methods",
        default="plain (pool),reweight,bm25,dsir,classifier,mix",
        help="(d): comma-separated subset of the methods",
    )
    parser.add_argument("--d-name", default=None, help="(d): key of the result in reweight.json")
    parser.add_argument("--d-mc-style", default="letter_text", choices=["letter_text", "letter", "text"])
    parser.add_argument(
        "--mc-style",
        default="letter_text",
        choices=["letter_text", "letter", "text"],
        help="(c): answer format",
    )
    parser.add_argument(
        "--similarity", default="low_rank", choices=["low_rank", "dense", "exact"], help="(c): the score"
    )
    parser.add_argument("--c-epochs", type=int, default=1, help="(c): passes over the noisy training set")
    parser.add_argument(
        "--score", default="dot", choices=["dot", "cosine", "layer_cosine"], help="(c): reweighting score"
    )
    parser.add_argument("--c-task", default="sciq", help="(c): the built-in multiple-choice task to corrupt")
    parser.add_argument("--c-val-batch", type=int, default=2, help="(c): validation samples per step")
    parser.add_argument("--c-warm-steps", type=int, default=0, help="(c): clean warm-start steps")
    parser.add_argument("--c-warm-lr", type=float, default=5e-4, help="(c): warm-start learning rate")
    parser.add_argument("--val-balance", default="none", choices=["none", "answer"], help="(c): our option")
    parser.add_argument(
        "--shared-direction", default="keep", choices=["keep", "remove"], help="(c): our option"
    )
    parser.add_argument("--probe-steps", default="0,40,80,160", help="(probe): checkpoints (steps)")
    parser.add_argument("--probe-name", default=None, help="(probe): key of the result in reweight.json")
    parser.add_argument("--c-name", default=None, help="(c): key of the result in reweight.json")
    parser.add_argument(
        "--model",
        default=None,
        help="embedded name or HF path (default smollm2-135m); (c) and probe keys get it",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global MODEL
    if args.model:
        MODEL = os.environ[MODEL_ENV] = args.model
    model_suffix = "" if MODEL == "smollm2-135m" else "_" + MODEL.replace("/", "_").replace("-", "_")
    seeds = [int(s) for s in args.seeds.split(",")]
    path = Path(__file__).resolve().parent / "results" / "reweight.json"
    results: dict[str, Any] = {"machine": machine()}
    parts = args.parts.split(",")
    if "a" in parts:
        results["a_memory"] = part_a()
    if "b" in parts:
        results["b_time"] = part_b(args.repeats)
    if "c" in parts:
        key = (
            "c_noisy_labels"
            + "".join(
                f"_{v}"
                for v, default in (
                    (args.mc_style, "letter_text"),
                    (args.similarity, "low_rank"),
                    (args.score, "dot"),
                    (args.c_task, "sciq"),
                    ("balanced", "balanced" if args.val_balance == "none" else ""),
                    ("unshared", "unshared" if args.shared_direction == "keep" else ""),
                )
                if v != default
            )
            + (f"_{args.c_epochs}epochs" if args.c_epochs > 1 else "")
            + (f"_val{args.c_val_batch}" if args.c_val_batch != 2 else "")
            + (f"_warm{args.c_warm_steps}" if args.c_warm_steps else "")
        )
        key = args.c_name or key + model_suffix
        results[key] = part_c(
            seeds,
            n_train=args.steps * TRAIN_BATCH,
            steps=args.steps,
            lr=args.lr,
            style=args.mc_style,
            similarity=args.similarity,
            epochs=args.c_epochs,
            score=args.score,
            task_name=args.c_task,
            val_batch=args.c_val_batch,
            warm_steps=args.c_warm_steps,
            warm_lr=args.c_warm_lr,
            val_balance=args.val_balance,
            shared_direction=args.shared_direction,
        )
    if "probe" in parts:
        key = f"c_probe_{args.c_task}" + (f"_warm{args.c_warm_steps}" if args.c_warm_steps else "")
        results[args.probe_name or key + model_suffix] = part_c_probe(
            seeds,
            n_train=args.steps * TRAIN_BATCH,
            checkpoints=[int(c) for c in args.probe_steps.split(",")],
            lr=args.lr,
            task_name=args.c_task,
            style=args.mc_style,
            warm_steps=args.c_warm_steps,
            warm_lr=args.c_warm_lr,
        )
    if "d" in parts:
        pool = args.d_pool.split(",")
        key = args.d_name or ("d_table2" if args.d_target == "arc_easy" else f"d_table2_{args.d_target}")
        results[key] = part_d(
            seeds,
            per_task=args.d_per_task,
            steps=args.d_steps,
            lr=args.d_lr or args.lr,
            k=args.d_k,
            target_name=args.d_target,
            pool_tasks=pool,
            related=args.d_related or pool[0],
            style=args.d_mc_style,
            val_batch=args.d_val_batch,
            methods=args.d_methods.split(","),
        )
    previous = json.loads(path.read_text()) if path.exists() else {}  # parts may run as separate processes
    print(f"\nwrote {save('reweight', {**previous, **results})}")


if __name__ == "__main__":
    main()
