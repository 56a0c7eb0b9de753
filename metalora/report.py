"""A run's ``report.md`` with matplotlib plots: loss curves per task, accuracy per task against the base
model, sample-weight histograms (reweight runs), and the efficiency counters.

Reads what the run directory holds (``metrics.jsonl``, ``summary.json`` or ``counters.json``, ``eval.json``,
``config.yaml``) and writes ``report.md`` and ``plots/*.png``. Anything missing is left out of the report
rather than failing it, so a report can be made for a run that is still going or was stopped.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metalora import atomic  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if "step" in r and "event" not in r]


def loss_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``loss`` and every ``loss/<task>`` key as (steps, values)."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        for key, value in r.items():
            if (
                (key == "loss" or key.startswith("loss/"))
                and isinstance(value, (int, float))
                and math.isfinite(value)
            ):
                series[key][0].append(r["step"])
                series[key][1].append(float(value))
    return dict(series)


def plot_losses(series: dict[str, tuple[list[int], list[float]]], path: Path) -> Path | None:
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in sorted(series.items()):
        label = "all tasks" if key == "loss" else key.split("/", 1)[1]
        ax.plot(steps, values, label=label, lw=2 if key == "loss" else 1, alpha=1 if key == "loss" else 0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per response token)")
    ax.set_title("Training loss per task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]] | None, path: Path
) -> Path | None:
    if not after:
        return None
    names = list(after)
    metric = {
        n: after[n].get("primary", "exact_match" if "exact_match" in after[n] else "acc") for n in names
    }
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    xs = range(len(names))
    width = 0.38
    if before:
        ax.bar([x - width / 2 for x in xs], [before[n][metric[n]] for n in names], width, label="base model")
    ax.bar([x + width / 2 for x in xs], [after[n][metric[n]] for n in names], width, label="adapted")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out " + "/".join(sorted(set(metric.values()))))
    ax.set_title("Per-task accuracy: base vs adapted")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _counters(run_dir: Path) -> dict[str, Any] | None:
    for name in ("summary.json", "counters.json"):
        data = _read_json(run_dir / name)
        if data is not None:
            return data.get("counters", data)
    return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_report(run_dir: str | Path, title: str | None = None, notes: str = "") -> Path:
    """Make ``plots/*.png`` and ``report.md`` for a run directory; returns the report's path."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    lines = [f"# {title or 'metalora run: ' + run_dir.name}", ""]
    if notes:
        lines += [notes, ""]
    evaluation = _read_json(run_dir / "eval.json")
    if evaluation:
        from metalora.evaluate import format_table

        after, before = evaluation["after"], evaluation.get("base")
        lines += ["## Held-out evaluation", "", format_table(after, before), ""]
        if plot_accuracy(after, before, plots / "accuracy.png"):
            lines += ["![per-task accuracy](plots/accuracy.png)", ""]
    series = loss_series(read_metrics(run_dir))
    if plot_losses(series, plots / "loss.png"):
        lines += ["## Training loss", "", "![loss per task](plots/loss.png)", ""]
    for hist in sorted([*run_dir.glob("*weight*.png"), *plots.glob("*weight*.png")]):
        rel = hist.relative_to(run_dir).as_posix()
        lines += [
            "## Sample weights",
            "",
            f"![sample weights]({rel})",
            "",
            "Per-sample weights with their sample ids: `sample_weights.jsonl` (mean weight per sample) "
            "and `weights.jsonl` (every step).",
            "",
        ]
    counters = _counters(run_dir)
    if counters:
        lines += ["## Efficiency counters", "", "| counter | value |", "|---|---|"]
        for key, value in counters.items():
            shown = (
                _human_bytes(value)
                if key.endswith("bytes") and isinstance(value, (int, float))
                else (f"{value:.1f}" if isinstance(value, float) else value)
            )
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    for name, label in (
        ("adapter", "metalora adapter (safetensors + JSON)"),
        ("peft_adapter", "PEFT LoRA export"),
    ):
        if (run_dir / name).is_dir():
            lines.append(f"- {label}: `{run_dir / name}`")
    if (run_dir / "config.yaml").is_file():
        lines.append(f"- resolved config: `{run_dir / 'config.yaml'}`")
    return atomic.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
