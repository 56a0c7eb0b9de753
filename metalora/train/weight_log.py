"""Reweighting's weight records: ``weights.jsonl`` (per step: sample ids, u, w, ℓ), and what is made of it at
the end of a run — ``sample_weights.jsonl`` (each sample's mean B·w over the steps it was drawn) and the
histogram ``weights_hist.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalora import atomic
from metalora.rundir import RunDir


def read_weight_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``weights.jsonl`` (the last one per step, should a resume have repeated any)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = RunDir(run_dir).weights
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "step" in record and "weights" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def mean_sample_weights(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per sample id: the mean of B·w over the steps it was drawn (1 = a uniform share) and how often."""
    sums: dict[str, list[float]] = {}
    for r in records:
        b = len(r["weights"])
        for sid, w in zip(r["sample_ids"], r["weights"], strict=True):
            sums.setdefault(sid, []).append(b * w)
    return {sid: {"mean_relative_weight": sum(v) / len(v), "times_drawn": len(v)} for sid, v in sums.items()}


def summarize_weights(run_dir: str | Path) -> None:
    """Write ``sample_weights.jsonl`` and the histogram ``weights_hist.png`` from ``weights.jsonl``."""
    run_dir = Path(run_dir)
    records = read_weight_log(run_dir)
    per_sample = mean_sample_weights(records)
    atomic.write_text(
        RunDir(run_dir).sample_weights,
        "".join(json.dumps({"sample_id": k, **v}) + "\n" for k, v in sorted(per_sample.items())),
    )
    plot_weight_histogram(records, per_sample, RunDir(run_dir).weights_hist)


def plot_weight_histogram(
    records: Sequence[dict[str, Any]], per_sample: dict[str, dict[str, float]], path: Path
) -> None:
    import matplotlib  # optional dependency: only the histogram needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = [len(r["weights"]) * w for r in records for w in r["weights"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(relative, bins=40, color="tab:blue")
    axes[0].axvline(1.0, color="k", ls="--", lw=1, label="uniform (1/B)")
    axes[0].set(xlabel="B·w (per step, per sample)", ylabel="count", title="sample weights over all steps")
    axes[0].legend()
    axes[1].hist([v["mean_relative_weight"] for v in per_sample.values()], bins=40, color="tab:orange")
    axes[1].set(xlabel="mean B·w of a sample", ylabel="samples", title="per-sample mean weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
