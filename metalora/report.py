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
from metalora.rundir import RunDir  # noqa: E402


def format_table(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]] | None = None
) -> str:
    """Markdown: each task's primary metric, base vs adapted and the difference; one score column when
    there is no base to compare with (the target is a base model)."""
    if before is None:
        lines = ["| task | n | metric | score |", "|---|---|---|---|"]
    else:
        lines = ["| task | n | metric | base | adapted | Δ |", "|---|---|---|---|---|---|"]
    for name, stats in after.items():
        metric = stats.get("primary", "exact_match" if "exact_match" in stats else "acc")
        if before is None:
            lines.append(f"| {name} | {stats['n']} | {metric} | {stats[metric]:.3f} |")
            continue
        b = before[name][metric]
        lines.append(
            f"| {name} | {stats['n']} | {metric} | {b:.3f} | {stats[metric]:.3f} | {stats[metric] - b:+.3f} |"
        )
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(run_dir).metrics
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG (its directory made) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _counters(run_dir: Path) -> dict[str, Any] | None:
    for path in (RunDir(run_dir).summary, RunDir(run_dir).counters):
        data = _read_json(path)
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
    run = RunDir(run_dir)
    lines = [f"# {title or 'metalora run: ' + run.root.name}", ""]
    if notes:
        lines += [notes, ""]
    lines += _evaluation_section(run) + _loss_section(run) + _weights_section(run) + _counters_section(run)
    for path, label in (
        (run.adapter, "metalora adapter (safetensors + JSON)"),
        (run.peft_adapter, "PEFT LoRA export"),
    ):
        if path.is_dir():
            lines.append(f"- {label}: `{path}`")
    if run.config.is_file():
        lines.append(f"- resolved config: `{run.config}`")
    return atomic.write_text(run.report, "\n".join(lines) + "\n")


def _evaluation_section(run: RunDir) -> list[str]:
    evaluation = _read_json(run.eval)
    if not evaluation:
        return []
    after, before = evaluation["after"], evaluation.get("base")
    lines = ["## Held-out evaluation", "", format_table(after, before), ""]
    if plot_accuracy(after, before, run.plots / "accuracy.png"):
        lines += ["![per-task accuracy](plots/accuracy.png)", ""]
    return lines


def _loss_section(run: RunDir) -> list[str]:
    if plot_losses(loss_series(read_metrics(run.root)), run.plots / "loss.png"):
        return ["## Training loss", "", "![loss per task](plots/loss.png)", ""]
    return []


def _weights_section(run: RunDir) -> list[str]:
    lines: list[str] = []
    for hist in sorted([*run.root.glob("*weight*.png"), *run.plots.glob("*weight*.png")]):
        rel = hist.relative_to(run.root).as_posix()
        lines += [
            "## Sample weights",
            "",
            f"![sample weights]({rel})",
            "",
            f"Per-sample weights with their sample ids: `{run.sample_weights.name}` (mean weight per sample) "
            f"and `{run.weights.name}` (every step).",
            "",
        ]
    return lines


def _counters_section(run: RunDir) -> list[str]:
    counters = _counters(run.root)
    if not counters:
        return []
    lines = ["## Efficiency counters", "", "| counter | value |", "|---|---|"]
    for key, value in counters.items():
        shown = (
            _human_bytes(value)
            if key.endswith("bytes") and isinstance(value, (int, float))
            else (f"{value:.1f}" if isinstance(value, float) else value)
        )
        lines.append(f"| {key} | {shown} |")
    return lines + [""]
