"""META-LoRA reweighting on SmolLM2-135M with real built-in data: memory, step time, noisy labels, Table 2.

    python benchmarks/reweight.py [--parts a,b,c,d] [--seeds 0,1]

(a) peak memory of one reweighting step over one plain LoRA step, same training batch (each in a fresh
    subprocess, peak RSS reset right before the measured step, after one warm-up step of the same kind);
(b) step time, interleaved medians in one process: plain LoRA on T; the floor — plain LoRA on T plus a
    forward/backward of V, the work any scheme must do; reweighting with the one-backward ``fused``
    scheme and with the published ``two_backward`` scheme; plus the agreement of the low-rank (L) and
    dense (D) scores with the ``exact`` per-sample-gradient scores on one batch;
(c) noisy labels: 30% of a real task's training answers replaced by a wrong option; AUC with which each
    sample's mean learned weight separates clean from corrupted, and held-out accuracy vs plain LoRA;
(d) a small Table-2 analogue: a mixed pool of four tasks, validation on ARC-Easy dev, test on ARC-Easy
    test; plain LoRA on the pool, reweighting, and the selection baselines (BM25, DSIR, classifier, MIX).

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

MODEL = "smollm2-135m"
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


def part_c(
    seeds: list[int],
    n_train: int,
    steps: int,
    lr: float,
    style: str = "letter_text",
    similarity: str = "low_rank",
    epochs: int = 1,
    score: str = "dot",
) -> dict[str, Any]:
    """``style``: how answers are written (``letter_text`` " B. <option>", or cloze ``text`` " <option>", where
    the whole loss sits on the answer's content and accuracy is length-normalised); ``similarity``: the
    reweighting score (``exact`` = true per-sample gradient inner products, the reference); ``epochs``: passes
    over the ``n_train`` samples (``steps`` per pass); with more than one, the AUC is also reported from the
    weights of the later passes only, when the adapter has learned from the clean majority."""
    from metalora.data import TaskSpec, load_task
    from metalora.eval.metrics import auc_roc
    from metalora.train.reweight import mean_sample_weights, read_weight_log

    torch.set_num_threads(1)
    task = load_task(TaskSpec(name="sciq", mc_response=style))
    results = []
    for seed in seeds:
        train_ex, is_bad = corrupt(task.train[:n_train], 0.3, seed, style)
        runs = {}
        for method in ("plain", "reweight"):
            model, tok = load_model(seed)
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
                        val_batch_size=2,
                        similarity=similarity,
                        score=score,
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
        f"\n(c) noisy labels: sciq, {n_train} train (30% wrong answers), 32 clean dev for validation "
        f"(2 per step), {steps * epochs} steps of {TRAIN_BATCH} ({epochs} epochs), lr {lr}, "
        f"test = sciq test ({len(task.test)})"
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
    }


# --- (d) Table-2 analogue --------------------------------------------------------------------------------


def part_d(seeds: list[int], per_task: int, steps: int, lr: float, k: int) -> dict[str, Any]:
    from metalora.data import Example, load_task
    from metalora.select import read_jsonl, select_jsonl, write_jsonl

    torch.set_num_threads(1)
    pool_tasks = ["sciq", "piqa", "siqa", "boolq"]
    pool = [ex for name in pool_tasks for ex in load_task(name).train[:per_task]]
    target = load_task("arc_easy")
    val_ex, test_ex = target.dev[:32], target.test
    base_model, tok = load_model(0)
    zero_shot = mc_accuracy(base_model, tok, test_ex, max_length=EVAL_MAX_LEN)
    print({"base model (no training)": zero_shot}, flush=True)
    del base_model
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            write_jsonl(
                [{"prompt": e.prompt, "response": e.response, "id": e.id, "task": e.task} for e in pool],
                d / "pool.jsonl",
            )
            write_jsonl(
                [{"prompt": e.prompt, "response": e.response, "id": e.id, "task": e.task} for e in val_ex],
                d / "val.jsonl",
            )
            train_sets: dict[str, list] = {"plain (pool)": pool, "reweight": pool}
            for method in ("bm25", "dsir", "classifier", "mix"):
                kw = {"ratio": 10.0} if method == "mix" else {"k": k}
                select_jsonl(
                    method, d / "pool.jsonl", d / "val.jsonl", d / f"{method}.jsonl", seed=seed, **kw
                )
                chosen = read_jsonl(d / f"{method}.jsonl")
                train_sets[method] = [
                    Example(
                        prompt=r["prompt"],
                        response=r["response"],
                        task=r.get("task", "x"),
                        id=str(r.get("id", i)),
                    )
                    for i, r in enumerate(chosen)
                ]
            for method, examples in train_sets.items():
                model, tok = load_model(seed)
                feats = features(tok, examples, max_length=TRAIN_MAX_LEN)
                t0 = time.perf_counter()
                if method == "reweight":
                    train_rw(
                        model,
                        feats,
                        features(tok, val_ex),
                        steps,
                        lr,
                        seed,
                        d / "rw",
                        tok.pad_token_id,
                        val_batch_size=2,
                    )
                else:
                    train_plain(model, feats, steps, lr, seed, d / method.split()[0], tok.pad_token_id)
                row = {
                    "seed": seed,
                    "method": method,
                    "train_size": len(feats),
                    "arc_easy_test_acc": mc_accuracy(model, tok, test_ex, max_length=EVAL_MAX_LEN),
                    "train_s": time.perf_counter() - t0,
                }
                if method not in ("plain (pool)", "reweight"):
                    row["from_sciq"] = sum(
                        1 for e in examples if str(e.task) == "sciq" or "sciq" in e.id
                    ) / len(examples)
                rows.append(row)
                print(row, flush=True)
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        accs = [r["arc_easy_test_acc"] for r in rows if r["method"] == method]
        summary.append(
            {
                "method": method,
                "mean_acc": float(np.mean(accs)),
                "std_acc": float(np.std(accs)),
                "seeds": len(accs),
            }
        )
    summary.append({"method": "base model (no training)", "mean_acc": zero_shot, "std_acc": 0.0, "seeds": 1})
    print(
        f"\n(d) Table-2 analogue: pool = {per_task} train each of {pool_tasks}; validation = 32 ARC-Easy dev; "
        f"test = ARC-Easy test ({len(test_ex)}); {steps} steps of {TRAIN_BATCH}, lr {lr}; selection keeps k={k}"
    )
    print(table(summary, list(summary[0])))
    return {
        "rows": rows,
        "summary": summary,
        "pool_tasks": pool_tasks,
        "per_task": per_task,
        "steps": steps,
        "lr": lr,
        "k": k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--d-steps", type=int, default=10)
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
    parser.add_argument("--score", default="dot", choices=["dot", "cosine"], help="(c): reweighting score")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
                )
                if v != default
            )
            + (f"_{args.c_epochs}epochs" if args.c_epochs > 1 else "")
        )
        results[key] = part_c(
            seeds,
            n_train=args.steps * TRAIN_BATCH,
            steps=args.steps,
            lr=args.lr,
            style=args.mc_style,
            similarity=args.similarity,
            epochs=args.c_epochs,
            score=args.score,
        )
    if "d" in parts:
        results["d_table2"] = part_d(seeds, per_task=20, steps=args.d_steps, lr=args.lr, k=24)
    previous = json.loads(path.read_text()) if path.exists() else {}  # parts may run as separate processes
    print(f"\nwrote {save('reweight', {**previous, **results})}")


if __name__ == "__main__":
    main()
