"""(a) META-LoRA reweighting: peak memory of one reweighting step over one plain LoRA step.

Same training batch (the first SciQ examples), each step kind in a fresh subprocess: peak RSS reset right
before the measured step, after one warm-up step of the same kind, under two allocator settings.
``python benchmarks/reweight_memory.py [--model NAME] [--a-setup ours|paper]``; writes ``a_memory`` (``ours``:
batch 8 + 1 validation sample, r=16 on q,k,v,o, ≤128 tokens) or ``a_memory_paper`` (``paper``: the META
paper's Table 3 setting, batch 4 + a validation batch of 4 as in the published code, r=32 on attention and
MLP, ≤400 tokens) in ``benchmarks/results/reweight.json``.
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
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETUPS: dict[str, dict[str, Any]] = {  # setup -> batch sizes, rank, adapted layers, max length
    "ours": {"train": TRAIN_BATCH, "val": VAL_BATCH, "r": R, "targets": None, "max_len": MAX_LEN},
    "paper": {"train": 4, "val": 4, "r": 32, "targets": ALL_TARGETS, "max_len": 400},
    # the same, validating on the training batch itself: the validation pass has the training pass's shape,
    # so what remains is reweighting's own state (SciQ's first dev items are longer than its first train
    # items: 189 against 127 tokens at most, and the longer pass sets the peak in "paper")
    "paper_same_shape": {"train": 4, "val": 4, "r": 32, "targets": ALL_TARGETS, "max_len": 400, "same": True},
}
RESULT_KEYS = {"ours": "a_memory", "paper": "a_memory_paper", "paper_same_shape": "a_memory_paper_same_shape"}


def memory_probe(kind: str, setup: str = "ours") -> dict[str, int]:
    """In a fresh process: peak RSS of one step of ``kind`` after one warm-up step of the same kind (one
    thread: the same for every kind, and no OpenMP stalls when the machine is shared)."""
    torch.set_num_threads(1)
    s = SETUPS[setup]
    model, tok = load_model(r=s["r"], **({"targets": s["targets"]} if s["targets"] else {}))
    nudge_b(model)
    model.train()
    train, val = real_batches(tok, s["train"], s["val"], s["max_len"])
    if s.get("same"):
        val = train[: s["val"]]
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


def part_a(kinds: tuple[str, ...] = KINDS, setup: str = "ours") -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for setting, env in MALLOC_SETTINGS.items():
        out[setting] = {
            kind: run_in_fresh_process("reweight_memory", "memory_probe", kind, setup, env=env)
            for kind in kinds
        }
        rows += _rows(setting, out[setting])
    s = SETUPS[setup]
    layers = "attention and MLP" if s["targets"] else "q,k,v,o"
    layers += ", validation batch = the training batch" if s.get("same") else ""
    print(
        f"\n(a) peak memory, batch {s['train']}+{s['val']} val, ≤{s['max_len']} tokens, r={s['r']} {layers} "
        "(fresh process each; peak RSS reset after one warm-up step)"
    )
    print(table(rows, list(rows[0])))
    return {"probes": out, "rows": rows, "setup": {**s, "targets": list(s["targets"] or [])}}


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
    """The doc's tables of (a), printed from ``a_memory`` / ``a_memory_paper`` in the stored results."""
    return {key: _memory_table(stored[key]) for key in RESULT_KEYS.values() if key in stored}


def _memory_table(result: Mapping[str, Any]) -> str:
    """One setup's table, live memory first."""
    rows = sorted(result["rows"], key=lambda r: list(ALLOCATOR_LABELS).index(r["allocator"]))
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
    return markdown_table(header, cells)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--a-setup", choices=sorted(SETUPS), default="ours",
        help="(a): ours (batch 8+1, r=16 q,k,v,o, 128 tokens), paper (batch 4+4, r=32 attention+MLP, 400), "
        "paper_same_shape (paper, validating on the training batch)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = getattr(args, "a_setup", "ours")
    return {RESULT_KEYS[setup]: part_a(setup=setup)}


if __name__ == "__main__":
    experiment_main(__doc__.splitlines()[0], add_arguments, run)
