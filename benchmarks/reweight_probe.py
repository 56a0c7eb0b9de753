"""(probe) Is the label-noise signal in the gradients at all? The best case of the reweighting score.

Plain LoRA trains on (c)'s noisy set (batches of 8 drawn at random; optionally after (c)'s warm start);
at each checkpoint the exact per-sample gradient ∇ℓ_i of every training sample (``PerSampleLoRAGrads``) is
scored against the mean gradient of all 32 validation samples — no low-rank approximation, no validation
sub-batch — and the AUC (clean = positive) of that dot product, of its cosine and of −ℓ_i is reported with
held-out accuracy; so are the scores against our validation directions (``val_direction``), alone and
together, and ``layer_cosine`` (each layer's gradient at unit norm), and how well the dot product
separates the *given* labels of a binary task.

    python benchmarks/reweight_probe.py --c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40

The key in ``results/reweight.json`` is ``c_probe_<task>[_warm<N>][_<model>]`` (``result_key``), or ``--probe-name``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
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
    nudge_b,
    plain_steps,
    seeds,
    warm_start,
)

from metalora.adapters import adapter_parameters  # noqa: E402
from metalora.data import TaskSpec, collate, load_task  # noqa: E402
from metalora.eval.metrics import auc_roc  # noqa: E402
from metalora.train.lora_grads import PerSampleLoRAGrads, layer_parameter_names  # noqa: E402
from metalora.train.loss import forward_losses  # noqa: E402
from metalora.train.similarity import layer_unit_rows  # noqa: E402
from metalora.train.val_direction import answer_groups, validation_coefficients  # noqa: E402


def result_key(config: Mapping[str, Any]) -> str:
    """``c_probe_<task>``, ``_warm<N>`` after a warm start, ``_<model>`` for another model than the default."""
    warm = config.get("warm_steps") or 0
    return (
        f"c_probe_{config['task']}"
        + (f"_warm{warm}" if warm else "")
        + model_suffix(config.get("model") or DEFAULT_MODEL)
    )


def exact_sample_grads(model, feats, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, P] float64 per-sample adapter gradients, [N] losses) of ``feats``, a batch at a time."""
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
    auc = auc_roc(given, score.tolist())
    return max(auc, 1 - auc)


def within_label_auc(clean: list[int], given: list[int], score: torch.Tensor) -> float:
    """Mean over the two *given* answers of a binary task of the clean-vs-corrupted AUC among the samples
    that carry that answer: the noise signal left once the label itself is held fixed."""
    aucs = []
    for answer in (0, 1):
        rows = [i for i, g in enumerate(given) if g == answer]
        aucs.append(auc_roc([clean[i] for i in rows], score[rows].tolist()))
    return float(np.mean(aucs))


def directed_scores(
    g_train: torch.Tensor, g_val: torch.Tensor, groups: list[int], balance: str, shared: str
) -> torch.Tensor:
    """⟨∇ℓ_i, Σ_v β_v ∇ℓ_v⟩ with β from the library's ``validation_coefficients`` on exact gradients."""
    return g_train @ (validation_coefficients(g_val @ g_val.T, groups, balance, shared) @ g_val)


def layer_normalized(model, g: torch.Tensor) -> torch.Tensor:
    """``exact_sample_grads``' rows with each adapted layer divided by its norm (the library's
    ``layer_unit_rows``, the exact form of ``score="layer_cosine"``)."""
    params = adapter_parameters(model)
    by_name = dict(zip(params, g.split([p.numel() for p in params.values()], dim=1), strict=True))
    return layer_unit_rows(by_name, layer_parameter_names(model))


def scores(model, g_train, g_val, val_groups) -> dict[str, torch.Tensor]:
    """Every score the probe compares, for all training samples."""
    norms = g_train.norm(dim=1).clamp_min(1e-30)
    dot = g_train @ g_val.mean(0)
    balanced = directed_scores(g_train, g_val, val_groups, "answer", "keep")
    pc_removed = directed_scores(g_train, g_val, val_groups, "none", "remove")
    both = directed_scores(g_train, g_val, val_groups, "answer", "remove")
    unit_val = g_val / g_val.norm(dim=1, keepdim=True).clamp_min(1e-30)
    l_train, l_val = layer_normalized(model, g_train), layer_normalized(model, g_val)
    return {
        "dot": dot,
        "cosine": dot / norms,
        "answer_balanced": balanced,
        "val_normalized": g_train @ unit_val.mean(0),
        "answer_balanced_cosine": balanced / norms,
        "pc_removed": pc_removed,
        "pc_removed_cosine": pc_removed / norms,
        "both_cosine": both / norms,
        "layer_cosine": l_train @ l_val.mean(0),
        "layer_cosine_both": directed_scores(l_train, l_val, val_groups, "answer", "remove"),
    }


def checkpoint_row(
    s: dict[str, torch.Tensor], labels: list[int], given: list[int], binary: bool
) -> dict[str, Any]:
    """AUCs of every score, the label separation of a binary task, the fraction of positive dot products."""
    is_clean = torch.tensor(labels, dtype=torch.bool)
    row: dict[str, Any] = {f"auc_{k}": auc_roc(labels, v.tolist()) for k, v in s.items()}
    row["label_separation_pc_removed"] = label_separation(given, s["pc_removed"]) if binary else None
    row["label_separation_balanced"] = label_separation(given, s["answer_balanced"]) if binary else None
    row["label_separation_dot"] = label_separation(given, s["dot"]) if binary else None
    row["auc_dot_within_label"] = within_label_auc(labels, given, s["dot"]) if binary else None
    row["frac_dot_positive_clean"] = float((s["dot"][is_clean] > 0).double().mean())
    row["frac_dot_positive_corrupt"] = float((s["dot"][~is_clean] > 0).double().mean())
    return row


COLUMNS = [
    "auc_dot", "auc_cosine", "auc_neg_loss", "auc_answer_balanced", "auc_val_normalized", "auc_answer_balanced_cosine",
    "auc_pc_removed", "auc_pc_removed_cosine", "auc_both_cosine", "auc_layer_cosine", "auc_layer_cosine_both",
    "label_separation_pc_removed", "label_separation_balanced", "label_separation_dot", "auc_dot_within_label",
    "frac_dot_positive_clean", "frac_dot_positive_corrupt",
]  # fmt: skip
"""A checkpoint row's columns after seed, step, accuracies and losses, in the stored order."""


def probe_seed(task, seed: int, cfg: dict[str, Any], checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    train_ex, is_bad = corrupt(task.train[: cfg["n_train"]], 0.3, seed, cfg["mc_response"])
    labels = [0 if b else 1 for b in is_bad]
    given = [int(ex.answer == 1) for ex in train_ex]
    binary = max(len(ex.options) for ex in train_ex) == 2
    model, tok = load_model(seed)
    pad = tok.pad_token_id
    rng = np.random.default_rng(seed)
    warm_acc = None
    if cfg["warm_steps"]:  # (c)'s warm start recipe
        warm_acc = warm_start(model, tok, task, cfg["n_train"], cfg["warm_steps"], cfg["warm_lr"], seed)
    else:
        nudge_b(model, 1e-3, seed)  # B = 0 would make every adapter-A gradient zero at checkpoint 0
    # one optimizer for the whole run, so the checkpoints do not change the trajectory
    opt = torch.optim.AdamW(adapter_parameters(model).values(), lr=cfg["lr"], weight_decay=0.0)
    feats = features(tok, train_ex, max_length=TRAIN_MAX_LEN)
    val = features(tok, task.dev[:32], max_length=TRAIN_MAX_LEN)
    rows, done = [], 0
    for checkpoint in checkpoints:
        draws = [
            [feats[i] for i in rng.choice(len(feats), TRAIN_BATCH, replace=False)]
            for _ in range(checkpoint - done)
        ]
        plain_steps(model, opt, draws, pad)
        done = checkpoint
        g_train, loss_train = exact_sample_grads(model, feats, pad)
        g_val, loss_val = exact_sample_grads(model, val, pad)
        s = {**scores(model, g_train, g_val, answer_groups(val)), "neg_loss": -loss_train}
        head = {
            "seed": seed,
            "step": checkpoint,
            "acc_warm_start": warm_acc,
            "test_acc": accuracy(model, tok, task),
        }
        losses = {"train_loss": float(loss_train.mean()), "val_loss": float(loss_val.mean())}
        computed = checkpoint_row(s, labels, given, binary)
        rows.append({**head, **losses, **{c: computed[c] for c in COLUMNS}})
        print(rows[-1], flush=True)
    return rows


def part_c_probe(seed_list: list[int], cfg: dict[str, Any], checkpoints: Sequence[int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    task = load_task(TaskSpec(name=cfg["task"], mc_response=cfg["mc_response"]))
    rows = [row for seed in seed_list for row in probe_seed(task, seed, cfg, checkpoints)]
    warm = cfg["warm_steps"]
    print(
        f"\n(c) probe: {cfg['task']}, {cfg['n_train']} train (30% wrong answers), exact per-sample gradients vs "
        f"the mean of 32 clean dev gradients; plain LoRA lr {cfg['lr']}"
        + (f" after {warm} clean warm-start steps (lr {cfg['warm_lr']})" if warm else "")
    )
    print(table(rows, list(rows[0])))
    return {"rows": rows, **cfg}


# The doc's probe tables: stored key, then (header, column) pairs after seed and step; "a / b" joins two.
PROBE_TABLES = {
    "probe": ("c_probe_sst2_warm40", [
        ("held-out acc", "test_acc"), ("AUC dot (the paper's u)", "auc_dot"), ("AUC cosine", "auc_cosine"),
        ("AUC −loss", "auc_neg_loss"), ("dot separates the given labels", "label_separation_dot"),
        ("AUC dot within a label", "auc_dot_within_label"), ("answer-balanced", "auc_answer_balanced"),
        ("answer-balanced, cosine", "**auc_answer_balanced_cosine"), ("shared removed", "auc_pc_removed"),
        ("shared removed, cosine", "**auc_pc_removed_cosine"),
        ("balanced / removed separate the labels", "label_separation_balanced / label_separation_pc_removed"),
    ]),
    "probe_layer_cosine": ("c_probe_sst2_warm40_layer_cosine", [
        ("held-out acc", "test_acc"), ("AUC dot (the paper's u)", "auc_dot"), ("AUC cosine", "auc_cosine"),
        ("both, cosine", "auc_both_cosine"), ("layer_cosine", "auc_layer_cosine"),
        ("**layer_cosine, both**", "**auc_layer_cosine_both"),
    ]),
    "probe_gemma": ("c_probe_sst2_warm40_gemma3_270m", [
        ("held-out acc", "test_acc"), ("AUC dot (the paper's u)", "auc_dot"), ("AUC cosine", "auc_cosine"),
        ("AUC −loss", "auc_neg_loss"), ("dot separates the given labels", "label_separation_dot"),
        ("AUC dot within a label", "auc_dot_within_label"), ("training loss", "train_loss"),
    ]),
}  # fmt: skip


def _cell(row: Mapping[str, Any], column: str) -> str:
    bold = "**" if column.startswith("**") else ""
    return " / ".join(f"{bold}{row[c]:.2f}{bold}" for c in column.removeprefix("**").split(" / "))


def markdown_tables(stored: Mapping[str, Any]) -> dict[str, str]:
    """The doc's probe tables (SmolLM2, its ``layer_cosine`` columns, Gemma 3 270M), printed from the stored
    results."""
    tables = {}
    for name, (key, columns) in PROBE_TABLES.items():
        if key in stored:
            rows = [
                [str(r["seed"]), str(r["step"]), *(_cell(r, c) for _, c in columns)]
                for r in stored[key]["rows"]
            ]
            tables[name] = markdown_table(["seed", "step", *(h for h, _ in columns)], rows)
    return tables


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The probe's settings, in the order ``results/reweight.json`` stores them beside the rows."""
    return {
        "task": args.c_task,
        "n_train": args.steps * TRAIN_BATCH,
        "lr": args.lr,
        "warm_steps": args.c_warm_steps,
        "warm_lr": args.c_warm_lr,
        "mc_response": args.mc_style,
        "model": model_name(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-steps", default="0,40,80,160", help="(probe): checkpoints (steps)")
    parser.add_argument("--probe-name", default=None, help="(probe): key of the result in reweight.json")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config(args)
    checkpoints = [int(c) for c in args.probe_steps.split(",")]
    return {args.probe_name or result_key(cfg): part_c_probe(seeds(args), cfg, checkpoints)}


if __name__ == "__main__":
    experiment_main(__doc__.splitlines()[0], add_arguments, run)
