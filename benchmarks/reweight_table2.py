"""(d) A small Table-2 analogue of META-LoRA: reweighting and the data-selection baselines on a mixed pool.

A pool of ``--d-per-task`` training examples of each of ``--d-pool``'s tasks (drawn per seed), validation on
32 examples of the target's dev split, test on its test split (``--d-target``, ARC-Easy by default). Plain
LoRA on the pool, reweighting, and the selection baselines (BM25, DSIR, classifier, MIX), each for
``--d-steps`` steps; held-out accuracy from the library's ``evaluate_tasks``.

    python benchmarks/reweight_table2.py --d-target sst2 --d-pool sst2,siqa,piqa,boolq --d-per-task 40
        --d-k 40 --d-steps 20 --lr 5e-4 --d-mc-style text

The key in ``results/reweight.json`` is ``d_table2`` (ARC-Easy) or ``d_table2_<target>`` (``result_key``),
or ``--d-name``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, table  # noqa: E402
from reweight_common import (  # noqa: E402
    STYLES,
    TRAIN_BATCH,
    TRAIN_MAX_LEN,
    accuracy,
    experiment_main,
    features,
    load_model,
    seeds,
    train_plain,
    train_rw,
)

from metalora.data import Example, TaskSpec, load_task  # noqa: E402
from metalora.select import read_jsonl, select_jsonl, write_jsonl  # noqa: E402
from metalora.train.weight_log import mean_sample_weights, read_weight_log  # noqa: E402

METHODS = ("plain (pool)", "reweight", "bm25", "dsir", "classifier", "mix")
SELECTIONS = ("bm25", "dsir", "classifier", "mix")


def result_key(config: Mapping[str, Any]) -> str:
    """``d_table2`` for the ARC-Easy target (the first one run, stored without its target), else ``d_table2_<target>``."""
    target = config.get("target") or "arc_easy"
    return "d_table2" if target == "arc_easy" else f"d_table2_{target}"


def _rows_of(examples) -> list[dict[str, str]]:
    return [{"prompt": e.prompt, "response": e.response, "id": e.id, "task": e.task} for e in examples]


def training_sets(pool, val_ex, d: Path, seed: int, k: int, methods: Sequence[str]) -> dict[str, list]:
    """The pool for plain LoRA and reweighting; each selection baseline's pick of it (k rows, MIX by ratio)."""
    write_jsonl(_rows_of(pool), d / "pool.jsonl")
    write_jsonl(_rows_of(val_ex), d / "val.jsonl")
    sets: dict[str, list] = {"plain (pool)": pool, "reweight": pool}
    for method in [m for m in SELECTIONS if m in methods]:
        kw = {"ratio": 10.0} if method == "mix" else {"k": k}
        select_jsonl(method, d / "pool.jsonl", d / "val.jsonl", d / f"{method}.jsonl", seed=seed, **kw)
        sets[method] = [
            Example(
                prompt=r["prompt"], response=r["response"], task=r.get("task", "x"), id=str(r.get("id", i))
            )
            for i, r in enumerate(read_jsonl(d / f"{method}.jsonl"))
        ]
    return sets


def _train_method(
    method: str, examples, val_ex, target, seed: int, cfg: dict[str, Any], d: Path
) -> dict[str, Any]:
    """Train one method from a fresh adapter; its row (accuracy, the related task's share, seconds)."""
    related = cfg["related"]
    model, tok = load_model(seed)
    feats = features(tok, examples, max_length=TRAIN_MAX_LEN)
    t0 = time.perf_counter()
    if method == "reweight":
        val = features(tok, val_ex, max_length=TRAIN_MAX_LEN)
        train_rw(
            model,
            feats,
            val,
            cfg["steps"],
            cfg["lr"],
            seed,
            d / "rw",
            tok.pad_token_id,
            val_batch_size=cfg["val_batch"],
        )
        weights = mean_sample_weights(read_weight_log(d / "rw"))
        task_of = {f["sample_id"]: e.task for f, e in zip(feats, examples, strict=True)}
        mass = {i: v["mean_relative_weight"] * v["times_drawn"] for i, v in weights.items()}
        share = sum(v for i, v in mass.items() if task_of[i] == related) / sum(mass.values())
    else:
        train_plain(model, feats, cfg["steps"], cfg["lr"], seed, d / method.split()[0], tok.pad_token_id)
        share = sum(1 for e in examples if str(e.task) == related) / len(examples)
    return {
        "seed": seed,
        "method": method,
        "train_size": len(feats),
        "test_acc": accuracy(model, tok, target),
        f"share_{related}": share,
        "train_s": time.perf_counter() - t0,
    }


def summary_rows(rows: list[dict[str, Any]], related: str, zero_shot: float) -> list[dict[str, Any]]:
    """Mean and spread of every method's accuracy over the seeds, and the untrained base model's."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        accs = [r["test_acc"] for r in rows if r["method"] == method]
        shares = [r[f"share_{related}"] for r in rows if r["method"] == method]
        out.append(
            {
                "method": method,
                "mean_acc": float(np.mean(accs)),
                "std_acc": float(np.std(accs)),
                f"share_{related}": float(np.mean(shares)),
                "seeds": len(accs),
            }
        )
    base = {"method": "base model (no training)", "mean_acc": zero_shot, "std_acc": 0.0}
    return [*out, {**base, f"share_{related}": None, "seeds": 1}]


def part_d(seed_list: list[int], cfg: dict[str, Any], methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Every method takes ``steps`` steps of ``TRAIN_BATCH``; a selection of k rows is repeated. ``related``:
    the pool task nearest the target, whose share of each method's training data (of the learned weight,
    for reweighting) is reported."""
    torch.set_num_threads(1)
    style, pool_tasks = cfg["mc_response"], cfg["pool_tasks"]
    tasks = {name: load_task(TaskSpec(name=name, mc_response=style)) for name in pool_tasks}
    target = load_task(TaskSpec(name=cfg["target"], mc_response=style))
    val_ex = target.dev[:32]
    base_model, tok = load_model(0)
    zero_shot = accuracy(base_model, tok, target)
    print({"base model (no training)": zero_shot}, flush=True)
    del base_model
    rows = []
    for seed in seed_list:
        rng = random.Random(seed)
        pool = [ex for name in pool_tasks for ex in rng.sample(tasks[name].train, cfg["per_task"])]
        with tempfile.TemporaryDirectory() as d:
            sets = training_sets(pool, val_ex, Path(d), seed, cfg["k"], methods)
            for method, examples in sets.items():
                if method in methods:
                    rows.append(_train_method(method, examples, val_ex, target, seed, cfg, Path(d)))
                    print(rows[-1], flush=True)
    summary = summary_rows(rows, cfg["related"], zero_shot)
    print(
        f"\n(d) Table-2 analogue: pool = {cfg['per_task']} train each of {list(pool_tasks)}; validation = 32 "
        f"{cfg['target']} dev; test = {cfg['target']} test ({len(target.test)}); {cfg['steps']} steps of "
        f"{TRAIN_BATCH}, lr {cfg['lr']}; selection keeps k={cfg['k']}; answers as {style}"
    )
    print(table(summary, list(summary[0])))
    return {"rows": rows, "summary": summary, **cfg}


def markdown_tables(stored: Mapping[str, Any]) -> dict[str, str]:
    """The doc's (d) tables, printed from the stored results: every ``d_table2*`` key's per-method summary
    (mean ± sd of held-out accuracy over the seeds, each seed's accuracy, the related task's share)."""
    tables = {}
    for key, result in stored.items():
        if not key.startswith("d_table2"):
            continue
        related = result.get("related", "sciq")
        acc = (
            "test_acc" if "test_acc" in result["rows"][0] else f"{result.get('target', 'arc_easy')}_test_acc"
        )
        rows = []
        for s in result["summary"]:
            per_seed = [r for r in result["rows"] if r["method"] == s["method"]]
            share = s.get(f"share_{related}")
            rows.append(
                [
                    s["method"],
                    f"{s['mean_acc']:.3f} ± {s['std_acc']:.3f}" if per_seed else f"{s['mean_acc']:.3f}",
                    " / ".join(f"{r[acc]:.2f}" for r in per_seed),
                    f"{share:.2f}" if share is not None else "",
                ]
            )
        header = ["method", "held-out acc, mean ± sd", "per seed", f"share of {related}"]
        tables[key] = markdown_table(header, rows)
    return tables


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The experiment's settings, in the order ``results/reweight.json`` stores them beside the rows."""
    pool = args.d_pool.split(",")
    return {
        "target": args.d_target,
        "pool_tasks": pool,
        "related": args.d_related or pool[0],
        "per_task": args.d_per_task,
        "steps": args.d_steps,
        "lr": args.d_lr or args.lr,
        "k": args.d_k,
        "mc_response": args.d_mc_style,
        "val_batch": args.d_val_batch,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        "--d-methods", default=",".join(METHODS), help="(d): comma-separated subset of the methods"
    )
    parser.add_argument("--d-name", default=None, help="(d): key of the result in reweight.json")
    parser.add_argument("--d-mc-style", default="letter_text", choices=STYLES)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config(args)
    return {args.d_name or result_key(cfg): part_d(seeds(args), cfg, args.d_methods.split(","))}


if __name__ == "__main__":
    experiment_main(__doc__.splitlines()[0], add_arguments, run)
