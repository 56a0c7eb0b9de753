"""(a) META-LoRA reweighting: peak memory of one reweighting step over one plain LoRA step.

Same training batch (the first SciQ examples, ≤128 tokens), each step kind in a fresh subprocess: peak RSS
reset right before the measured step, after one warm-up step of the same kind, under two allocator
settings. ``python benchmarks/reweight_memory.py [--model NAME]``; writes ``a_memory`` in
``benchmarks/results/reweight.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    current_rss_bytes,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    run_in_fresh_process,
    table,
)
from reweight_common import (  # noqa: E402
    MAX_LEN,
    TRAIN_BATCH,
    VAL_BATCH,
    R,
    experiment_main,
    load_model,
    nudge_b,
    plain_step_fn,
    real_batches,
    reweight_step_fn,
)

MALLOC_SETTINGS = {
    "glibc_default": {},
    # large blocks mmapped and unmapped on free: RSS follows live memory instead of the heap's high water
    "mmap_threshold_128KiB": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
}
KINDS = ("plain", "fused", "two_backward")


def memory_probe(kind: str) -> dict[str, int]:
    """In a fresh process: peak RSS of one step of ``kind`` after one warm-up step of the same kind (one
    thread: the same for every kind, and no OpenMP stalls when the machine is shared)."""
    torch.set_num_threads(1)
    model, tok = load_model()
    nudge_b(model)
    model.train()
    train, val = real_batches(tok)
    pad = tok.pad_token_id
    step = (
        plain_step_fn(model, train, pad)
        if kind == "plain"
        else reweight_step_fn(model, train, val, pad, scheme=kind)
    )
    step()  # warm-up: optimizer state, allocator pools
    gc.collect()
    reset_peak_rss()
    before = current_rss_bytes()
    step()
    peak = peak_rss_bytes()
    return {"peak_rss_bytes": peak, "rss_before_bytes": before, "peak_growth_bytes": peak - before}


def _rows(setting: str, probes: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    base = probes["plain"]
    return [
        {
            "allocator": setting,
            "step": k,
            "peak_rss_MiB": v["peak_rss_bytes"] / 2**20,
            "peak_ratio_vs_plain": v["peak_rss_bytes"] / base["peak_rss_bytes"],
            "step_growth_MiB": v["peak_growth_bytes"] / 2**20,
            "growth_ratio_vs_plain": v["peak_growth_bytes"] / max(base["peak_growth_bytes"], 1),
        }
        for k, v in probes.items()
    ]


def part_a(kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for setting, env in MALLOC_SETTINGS.items():
        out[setting] = {
            kind: run_in_fresh_process("reweight_memory", "memory_probe", kind, env=env) for kind in kinds
        }
        rows += _rows(setting, out[setting])
    print(
        f"\n(a) peak memory, batch {TRAIN_BATCH}+{VAL_BATCH} val, ≤{MAX_LEN} tokens, r={R} q,k,v,o "
        "(fresh process each; peak RSS reset after one warm-up step)"
    )
    print(table(rows, list(rows[0])))
    return {"probes": out, "rows": rows}


ALLOCATOR_LABELS = {
    "mmap_threshold_128KiB": "live memory (mmap threshold 128 KiB)",
    "glibc_default": "glibc default",
}
STEP_LABELS = {
    "plain": "plain LoRA",
    "fused": "reweight, fused (one backward)",
    "two_backward": "reweight, two backward passes",
}


def markdown_tables(stored: Mapping[str, Any]) -> dict[str, str]:
    """The doc's table of (a), printed from ``a_memory`` in the stored results (live memory first)."""
    if "a_memory" not in stored:
        return {}
    rows = sorted(stored["a_memory"]["rows"], key=lambda r: list(ALLOCATOR_LABELS).index(r["allocator"]))
    cells = []
    for r in rows:
        goal = (
            r["allocator"] == "mmap_threshold_128KiB" and r["step"] == "fused"
        )  # the row the goal is read on
        b = "**" if goal else ""
        cells.append(
            [
                ALLOCATOR_LABELS[r["allocator"]],
                STEP_LABELS[r["step"]],
                f"{r['peak_rss_MiB']:.0f} MiB",
                f"{b}{r['peak_ratio_vs_plain']:.3f}{b}",
                f"{r['step_growth_MiB']:.0f} MiB",
                f"{b}{r['growth_ratio_vs_plain']:.3f}{b}",
            ]
        )
    header = ["allocator", "step", "peak RSS", "vs plain", "growth during the step", "vs plain"]
    return {"a_memory": markdown_table(header, cells)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """(a) has no options of its own."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {"a_memory": part_a()}


if __name__ == "__main__":
    experiment_main(__doc__.splitlines()[0], add_arguments, run)
