"""(b) META-LoRA reweighting: step time against plain LoRA, and the low-rank scores against exact ones.

Interleaved medians of process CPU time in one process (1 thread): plain LoRA on T; the floor — plain LoRA
on T plus a forward/backward of V, the work any scheme must do; reweighting with the one-backward ``fused``
scheme and with the published ``two_backward`` scheme. Then the agreement of the low-rank (L) and dense
(D) scores with the ``exact`` per-sample-gradient scores on one batch.
``python benchmarks/reweight_time.py [--repeats 3] [--model NAME]``; writes ``b_time``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, markdown_table, table  # noqa: E402
from reweight_common import (  # noqa: E402
    MAX_LEN,
    TRAIN_BATCH,
    VAL_BATCH,
    experiment_main,
    features,
    load_model,
    nudge_b,
    plain_step_fn,
    real_batches,
    reweight_step_fn,
)

from metalora.data import collate, load_task  # noqa: E402
from metalora.train.reweight import ReweightConfig, Reweighting  # noqa: E402


def step_times(model, tok, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median CPU seconds per step kind, one round of wall seconds for plain and fused)."""
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
    return interleaved_medians(fns, repeats, warmup=1, clock=time.process_time), wall


def agreement(model, tok) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Spearman, Pearson and sign agreement of L and D with exact scores: 8 train, 2 val SciQ samples."""
    task = load_task("sciq")
    tr, va = features(tok, task.train[100:108]), features(tok, task.dev[10:12])
    pad = tok.pad_token_id
    scores = {}
    for similarity in ("exact", "low_rank", "dense"):
        rw = Reweighting(model, ReweightConfig.from_dict({"stats": {"similarity": similarity}}))
        v = rw.validation_stats(collate(va, pad), len(va))
        scores[similarity] = rw.gradient(collate(tr, pad), v, len(tr)).scores.numpy()
        model.zero_grad(set_to_none=True)
    rows = []
    for similarity in ("low_rank", "dense"):
        a, e = scores[similarity], scores["exact"]
        rows.append(
            {
                "similarity": similarity,
                "spearman_vs_exact": float(spearmanr(a, e).statistic),
                "pearson_vs_exact": float(pearsonr(a, e).statistic),
                "sign_agreement": float(np.mean(np.sign(a) == np.sign(e))),
            }
        )
    return rows, scores


def part_b(repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, tok = load_model()
    nudge_b(model)
    model.train()
    times, wall = step_times(model, tok, repeats)
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
    agree, scores = agreement(model, tok)
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


STEP_LABELS = {
    "plain_T": "plain LoRA step on the training batch",
    "floor_T+V": "floor: plain step + validation forward/backward",
    "reweight_fused": "reweight, fused",
    "reweight_two_backward": "reweight, two backward passes",
}


def markdown_tables(stored: Mapping[str, Any]) -> dict[str, str]:
    """The doc's tables of (b), printed from ``b_time`` in the stored results: step times, and the agreement
    of the low-rank and dense scores with the exact ones."""
    if "b_time" not in stored:
        return {}
    cells = []
    for r in stored["b_time"]["rows"]:
        b = "**" if r["step"] == "reweight_fused" else ""
        ratios = [f"{r['median_s']:.2f}", f"{r['ratio_vs_plain_T']:.3f}", f"{b}{r['ratio_vs_floor']:.3f}{b}"]
        cells.append([STEP_LABELS[r["step"]], *ratios])
    agree = [
        [
            a["similarity"],
            f"{a['spearman_vs_exact']:.3f}",
            f"{a['pearson_vs_exact']:.3f}",
            f"{a['sign_agreement']:.2f}",
        ]
        for a in stored["b_time"]["agreement"]
    ]
    return {
        "b_time": markdown_table(["step", "seconds", "vs plain", "vs floor"], cells),
        "b_agreement": markdown_table(["score", "Spearman vs exact", "Pearson vs exact", "same sign"], agree),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="(b): interleaved rounds")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {"b_time": part_b(args.repeats)}


if __name__ == "__main__":
    experiment_main(__doc__.splitlines()[0], add_arguments, run)
