"""(c) META-LoRA reweighting with noisy labels: do the learned weights separate clean from corrupted samples?

30% of a real task's training answers are replaced by a wrong option (``--c-task``, sciq by default; sst2
flips the label). Reported: the AUC with which each sample's mean learned weight separates clean from
corrupted, and held-out accuracy (the library's ``evaluate_tasks``) against plain LoRA. ``--c-warm-steps``
starts both from an adapter trained on clean, disjoint examples.

    python benchmarks/reweight_noisy_labels.py --c-task sst2 --mc-style text --steps 20 --lr 2e-4
        --c-warm-steps 40 --c-epochs 2 [--c-val-batch 8 --score layer_cosine --val-balance answer
        --shared-direction remove] [--model gemma3-270m]

The result's key in ``results/reweight.json`` is built from its config (``result_key``), or ``--c-name``.

Issue 16 item 6, the re-run under the corrected defaults (a validation batch of ``--c-val-batch`` drawn per
step, and ``weights.fallback: skip``: a batch whose every u ≤ 0 takes no step), stored beside the earlier
rows under their own names (table ``c_sst2_corrected``):

    python benchmarks/reweight.py --parts c --c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40
        --c-epochs 2 --c-val-batch 8 --c-name c_corrected_sst2_paper
    (the same) --score layer_cosine --val-balance answer --shared-direction remove --c-name c_corrected_sst2_ours
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, table  # noqa: E402
from reweight_common import (  # noqa: E402
    DEFAULT_MODEL,
    TRAIN_BATCH,
    TRAIN_MAX_LEN,
    accuracy,
    corrupt,
    experiment_main,
    features,
    load_model,
    model_name,
    model_suffix,
    seeds,
    train_plain,
    train_rw,
    warm_start,
)

from metalora.adapters import adapter_parameters  # noqa: E402
from metalora.data import TaskSpec, load_task  # noqa: E402
from metalora.eval.metrics import auc_roc  # noqa: E402
from metalora.train.weight_log import mean_sample_weights, read_weight_log  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "mc_response": "letter_text",
    "similarity": "low_rank",
    "score": "dot",
    "task": "sciq",
    "val_balance": "none",
    "shared_direction": "keep",
    "epochs": 1,
    "val_batch": 2,
    "warm_steps": 0,
    "model": DEFAULT_MODEL,
}
"""The config fields a result's key is built from, at their defaults (older results lack later fields)."""


def result_key(config: Mapping[str, Any]) -> str:
    """``c_noisy_labels`` plus every non-default setting, in a fixed order: a stored result's key from the
    config stored with it (``c_noisy_labels_text_sst2_2epochs_warm40_gemma3_270m``)."""
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS and v is not None}}
    named = [str(c[k]) for k in ("mc_response", "similarity", "score", "task") if c[k] != DEFAULTS[k]]
    named += ["balanced"] if c["val_balance"] != "none" else []
    named += ["unshared"] if c["shared_direction"] != "keep" else []
    named += [f"{c['epochs']}epochs"] if c["epochs"] > 1 else []
    named += [f"val{c['val_batch']}"] if c["val_batch"] != 2 else []
    named += [f"warm{c['warm_steps']}"] if c["warm_steps"] else []
    return "".join(f"_{n}" for n in ["c_noisy_labels", *named])[1:] + model_suffix(c["model"])


def _separation(feats, is_bad: list[bool], weights: dict, late: dict, epochs: int) -> dict[str, Any]:
    """AUC (clean = positive) of the mean learned weight over all steps and after epoch 1; mean B·w."""
    ids = [f["sample_id"] for f in feats]
    seen = [i for i, s in enumerate(ids) if s in weights]
    labels = [0 if is_bad[i] else 1 for i in seen]
    relative = [weights[ids[i]]["mean_relative_weight"] for i in seen]
    late_seen = [i for i in seen if ids[i] in late]
    auc_late = (
        auc_roc(
            [labels[seen.index(i)] for i in late_seen],
            [late[ids[i]]["mean_relative_weight"] for i in late_seen],
        )
        if epochs > 1
        else None
    )
    return {
        "auc_clean_vs_corrupt": auc_roc(labels, relative),
        "auc_after_epoch_1": auc_late,
        "samples_scored": len(seen),
        "mean_Bw_clean": float(np.mean([s for s, y in zip(relative, labels, strict=True) if y])),
        "mean_Bw_corrupt": float(np.mean([s for s, y in zip(relative, labels, strict=True) if not y])),
    }


def _train_one(method: str, task, train_ex, warm_state, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Plain LoRA or reweighting from the (warm) start; held-out accuracy, seconds, the weight records."""
    steps = cfg["steps"] * cfg["epochs"]
    model, tok = load_model(seed)
    if warm_state is not None:
        with torch.no_grad():
            for n, p in adapter_parameters(model).items():
                p.copy_(warm_state[n])
    feats = features(tok, train_ex, max_length=TRAIN_MAX_LEN)
    val = features(tok, task.dev[:32], max_length=TRAIN_MAX_LEN)
    records = None
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        if method == "plain":
            train_plain(model, feats, steps, cfg["lr"], seed, Path(d), tok.pad_token_id)
        else:
            reweight = {
                "val_batch_size": cfg["val_batch"],
                "stats": {"similarity": cfg["similarity"]},
                "direction": {
                    "score": cfg["score"],
                    "balance": cfg["val_balance"],
                    "shared": cfg["shared_direction"],
                },
            }
            train_rw(model, feats, val, steps, cfg["lr"], seed, Path(d), tok.pad_token_id, **reweight)
            records = read_weight_log(d)
        seconds = time.perf_counter() - t0
    return {"test_acc": accuracy(model, tok, task), "train_s": seconds, "records": records, "feats": feats}


def _seed_row(task, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    train_ex, is_bad = corrupt(task.train[: cfg["n_train"]], 0.3, seed, cfg["mc_response"])
    warm_state, warm_acc = None, None
    if cfg["warm_steps"]:
        model, tok = load_model(seed)
        warm_acc = warm_start(model, tok, task, cfg["n_train"], cfg["warm_steps"], cfg["warm_lr"], seed)
        warm_state = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    runs = {m: _train_one(m, task, train_ex, warm_state, seed, cfg) for m in ("plain", "reweight")}
    records = runs["reweight"]["records"]
    weights = mean_sample_weights(records)
    late = mean_sample_weights([r for r in records if r["step"] > cfg["steps"]])
    sep = _separation(runs["reweight"]["feats"], is_bad, weights, late, cfg["epochs"])
    return {
        "seed": seed,
        "auc_clean_vs_corrupt": sep["auc_clean_vs_corrupt"],
        "auc_after_epoch_1": sep["auc_after_epoch_1"],
        "acc_warm_start": warm_acc,
        "samples_scored": sep["samples_scored"],
        "mean_Bw_clean": sep["mean_Bw_clean"],
        "mean_Bw_corrupt": sep["mean_Bw_corrupt"],
        "acc_plain": runs["plain"]["test_acc"],
        "acc_reweight": runs["reweight"]["test_acc"],
        "train_s_plain": runs["plain"]["train_s"],
        "train_s_reweight": runs["reweight"]["train_s"],
    }


def part_c(seed_list: list[int], cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg``: ``config(args)``. ``mc_response``: how answers are written (``letter_text`` " B. <option>", or
    cloze ``text`` " <option>"); ``similarity``: the reweighting score (``exact`` = true per-sample gradient
    inner products, the reference); ``epochs``: passes over the ``n_train`` samples (``steps`` per pass);
    with more than one, the AUC is also reported from the weights of the later passes only.
    ``warm_steps``: both methods start from one adapter first trained (plain LoRA, ``warm_lr``) on clean
    training examples disjoint from the noisy ones, a stand-in for a model that already knows the task.
    ``val_balance``, ``shared_direction``: our validation-direction options (``reweight.direction``)."""
    torch.set_num_threads(1)
    task = load_task(TaskSpec(name=cfg["task"], mc_response=cfg["mc_response"]))
    results = []
    for seed in seed_list:
        results.append(_seed_row(task, seed, cfg))
        print(results[-1], flush=True)
    print(
        f"\n(c) noisy labels: {cfg['task']}, {cfg['n_train']} train (30% wrong answers), 32 clean dev for "
        f"validation ({cfg['val_batch']} per step), {cfg['steps'] * cfg['epochs']} steps of {TRAIN_BATCH} "
        f"({cfg['epochs']} epochs), lr {cfg['lr']}, test = {cfg['task']} test ({len(task.test)})"
    )
    print(table(results, list(results[0])))
    return {"rows": results, **cfg}


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The experiment's settings, in the order ``results/reweight.json`` stores them beside the rows."""
    return {
        "n_train": args.steps * TRAIN_BATCH,
        "steps": args.steps,
        "lr": args.lr,
        "mc_response": args.mc_style,
        "similarity": args.similarity,
        "epochs": args.c_epochs,
        "score": args.score,
        "task": args.c_task,
        "val_batch": args.c_val_batch,
        "warm_steps": args.c_warm_steps,
        "warm_lr": args.c_warm_lr,
        "val_balance": args.val_balance,
        "shared_direction": args.shared_direction,
        "model": model_name(),
    }


# The doc's (c) tables: (label, key) per row; a label's {fields} are filled from the stored config.
SCIQ_ROWS = [
    ('`letter_text` (" B. <option>")', "c_noisy_labels"),
    ('cloze `text` (" <option>", acc_norm)', "c_noisy_labels_text"),
    ("cloze, `exact` per-sample gradients (the reference)", "c_noisy_labels_text_exact"),
    (
        "cloze, {epochs} epochs ({total} steps); AUC of epochs 2–{epochs} only in brackets",
        "c_noisy_labels_text_3epochs",
    ),
    ("cloze, `score: cosine` (u_i / ‖∇ℓ_i‖, our option)", "c_noisy_labels_text_cosine"),
]
SST2_ROWS = [
    ("{steps} steps, lr {lr}", "c_noisy_labels_text_sst2"),
    ("{steps} steps, lr {lr}, `exact`", "c_noisy_labels_text_exact_sst2"),
    ("{epochs} epochs of {steps} steps ({n_train} samples), lr {lr}; epoch 2 only in brackets", "c_noisy_labels_text_sst2_2epochs_lr2e-4"),
    ("**warm start** ({warm_steps} steps on {warm_n} clean, disjoint examples), then {epochs} × {steps} steps, lr {lr}", "c_noisy_labels_text_sst2_2epochs_warm40"),
    ("warm start, {val_batch} validation samples per step, the paper's score", "c_noisy_labels_text_sst2_2epochs_val8_warm40"),
    ("warm start, {val_batch} per step, `val_balance: answer`, `shared_direction: remove`, `score: cosine` (ours)", "c_noisy_labels_text_cosine_sst2_balanced_unshared_2epochs_val8_warm40"),
    ("the same with all {val_batch} validation samples every step", "c_noisy_labels_text_cosine_sst2_balanced_unshared_2epochs_val32_warm40"),
    ("warm start, {val_batch} per step, both options, `score: layer_cosine` (ours)", "c_noisy_labels_text_layer_cosine_sst2_balanced_unshared_2epochs_val8_warm40"),
    ("the same with all {val_batch} validation samples every step", "c_noisy_labels_text_layer_cosine_sst2_balanced_unshared_2epochs_val32_warm40"),
]  # fmt: skip
CORRECTED_ROWS = [
    ("the paper's score, {val_batch} validation samples per step", "c_corrected_sst2_paper"),
    ("our options (`balance: answer`, `shared: remove`, `score: {score}`), {val_batch} per step", "c_corrected_sst2_ours"),
]  # fmt: skip
GEMMA_ROWS = [
    ("{seed}", "c_noisy_labels_text_sst2_2epochs_warm40_gemma3_270m"),
    ("{seed}, our options ({val_batch} per step, both directions, `{score}`)", "c_noisy_labels_text_layer_cosine_sst2_balanced_unshared_2epochs_val8_warm40_gemma3_270m"),
]  # fmt: skip


def _label(template: str, result: Mapping[str, Any], **extra: Any) -> str:
    c = {**DEFAULTS, **{k: v for k, v in result.items() if k != "rows"}, **extra}
    lr = f"{c['lr']:.0e}".replace("e-0", "e-")
    total = c["steps"] * c["epochs"]
    return template.format(**{**c, "lr": lr, "total": total, "warm_n": c["warm_steps"] * TRAIN_BATCH})


def _auc(row: Mapping[str, Any], bold: bool) -> str:
    b = "**" if bold else ""
    late = row.get("auc_after_epoch_1")
    return f"{b}{row['auc_clean_vs_corrupt']:.2f}{b}" + (f" ({late:.2f})" if late is not None else "")


def _per_seed(rows: list[Mapping[str, Any]], field: str) -> str:
    return " / ".join(f"{r[field]:.2f}" if r.get(field) is not None else "—" for r in rows)


def _weights(rows: list[Mapping[str, Any]]) -> str:
    return "; ".join(f"{r['mean_Bw_clean']:.2f} / {r['mean_Bw_corrupt']:.2f}" for r in rows)


def _seed_table_row(label: str, result: Mapping[str, Any], with_warm: bool) -> list[str]:
    rows = result["rows"]
    ours = result.get("val_balance", "none") != "none" or result.get("score", "dot") != "dot"
    aucs = [_auc(r, ours and result.get("task") == "sst2") for r in rows] + ["—"] * (2 - len(rows))
    warm = [_per_seed(rows, "acc_warm_start")] if with_warm else []
    plain, reweighted = _per_seed(rows, "acc_plain"), _per_seed(rows, "acc_reweight")
    return [label, *aucs, *warm, _weights(rows), plain, reweighted]


def markdown_tables(stored: Mapping[str, Any]) -> dict[str, str]:
    """The doc's (c) tables, printed from the stored results: sciq, SST-2, and SST-2 on Gemma 3 270M. AUC of
    the mean learned weight (clean = positive; in brackets after epoch 1), the mean weight of clean and of
    corrupted samples (× a uniform share), held-out accuracy of plain LoRA and of reweighting."""
    tables = {}
    weights = "mean weight clean / corrupted (s0; s1)"
    head = ["AUC seed 0", "AUC seed 1", weights, "held-out acc plain (s0 / s1)", "reweighted (s0 / s1)"]
    if all(k in stored for _, k in SCIQ_ROWS):
        rows = [_seed_table_row(_label(t, stored[k]), stored[k], False) for t, k in SCIQ_ROWS]
        tables["c_sciq"] = markdown_table(["answer format", *head], rows)
    if all(k in stored for _, k in SST2_ROWS):
        rows = [_seed_table_row(_label(t, stored[k]), stored[k], True) for t, k in SST2_ROWS]
        tables["c_sst2"] = markdown_table(["setting", *head[:2], "warm-start acc (s0 / s1)", *head[2:]], rows)
    if all(k in stored for _, k in CORRECTED_ROWS):
        rows = [_seed_table_row(_label(t, stored[k]), stored[k], True) for t, k in CORRECTED_ROWS]
        header = [
            "setting (warm start, 2 epochs, fallback: skip)",
            *head[:2],
            "warm-start acc (s0 / s1)",
            *head[2:],
        ]
        tables["c_sst2_corrected"] = markdown_table(header, rows)
    if all(k in stored for _, k in GEMMA_ROWS):
        rows = []
        for template, key in GEMMA_ROWS:
            ours = stored[key].get("score", "dot") != "dot"
            for r in stored[key]["rows"]:
                rows.append(
                    [
                        _label(template, stored[key], seed=r["seed"]),
                        f"{r['acc_warm_start']:.2f}",
                        _auc(r, ours),
                        _weights([r]),
                        f"{r['acc_plain']:.2f}",
                        f"{r['acc_reweight']:.2f}",
                    ]
                )
        header = [
            "seed",
            "warm start acc",
            "AUC (epoch 2 only)",
            "mean weight clean / corrupted",
            "held-out acc plain",
            "reweighted",
        ]
        tables["c_gemma"] = markdown_table(header, rows)
    return tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--similarity", default="low_rank", choices=["low_rank", "dense", "exact"], help="(c): the score"
    )
    parser.add_argument("--c-epochs", type=int, default=1, help="(c): passes over the noisy training set")
    parser.add_argument(
        "--score", default="dot", choices=["dot", "cosine", "layer_cosine"], help="(c): reweighting score"
    )
    parser.add_argument("--c-val-batch", type=int, default=2, help="(c): validation samples per step")
    parser.add_argument("--val-balance", default="none", choices=["none", "answer"], help="(c): our option")
    parser.add_argument(
        "--shared-direction", default="keep", choices=["keep", "remove"], help="(c): our option"
    )
    parser.add_argument("--c-name", default=None, help="(c): key of the result in reweight.json")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config(args)
    return {args.c_name or result_key(cfg): part_c(seeds(args), cfg)}


if __name__ == "__main__":
    experiment_main(__doc__.splitlines()[0], add_arguments, run)
