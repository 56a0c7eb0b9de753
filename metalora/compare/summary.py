"""The comparison's tables, statistics and plots: ``DIR/compare.json``, ``DIR/compare.md``, ``DIR/plots/``.

Per recipe and task: every seed's primary metric, their mean and 95% Student-t interval
(``metalora.stats.mean_ci``); the macro average over tasks the same way. Against ``--reference``: the
paired, task-stratified bootstrap over the same test items (``metalora.stats.paired_bootstrap``) of the
macro difference, with its interval and p-value. Beside them: trainable parameters, optimizer steps,
samples, tokens and wall time (means over seeds), and the learning rate each recipe ran with.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metalora import atomic  # noqa: E402
from metalora.compare.study import COST_KEYS  # noqa: E402
from metalora.report import save_figure  # noqa: E402
from metalora.stats import mean_ci, paired_bootstrap  # noqa: E402

MMLU_MATH = (
    "abstract_algebra",
    "college_mathematics",
    "elementary_mathematics",
    "high_school_mathematics",
    "high_school_statistics",
)
"""The MMLU subjects reported together as MMLU-math (the MeTA-LoRA paper reports MMLU-math apart)."""
WIDE = 12
"""Above this many tasks, ``compare.md`` shows the task groups and the ungrouped tasks, not every task."""


def task_groups(tasks: list[str]) -> dict[str, list[str]]:
    """Benchmark suites scored as many tasks, reported together: ``mmlu`` (every ``mmlu:<subject>``),
    ``mmlu_math`` (``MMLU_MATH``), ``bbh`` (every ``bbh:<task>``); a group needs two or more tasks."""
    groups = {
        "mmlu": [t for t in tasks if t.startswith("mmlu:")],
        "mmlu_math": [t for t in tasks if t.startswith("mmlu:") and t.split(":", 1)[1] in MMLU_MATH],
        "bbh": [t for t in tasks if t.startswith("bbh:")],
    }
    return {name: members for name, members in groups.items() if len(members) >= 2}


def group_score(scores: dict[str, dict[str, Any]], members: list[str], metrics: dict[str, str]) -> float:
    """The group's score: its items' mean primary metric (each task weighted by its item count ``n``)."""
    total = sum(scores[t]["n"] for t in members)
    return sum(scores[t][metrics[t]] * scores[t]["n"] for t in members) / total


def summarize(
    results: list[dict[str, Any]], reference: str | None, resamples: int = 10_000
) -> dict[str, Any]:
    """Aggregate per-run results (``study.run_job``) into per-recipe rows and reference comparisons."""
    by_recipe: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_recipe[r["recipe"]].append(r)
    rows = {name: _recipe_row(runs) for name, runs in by_recipe.items()}
    versus = {}
    if reference is not None:
        ref_items = _seed_mean_items(by_recipe[reference])
        for name, runs in by_recipe.items():
            if name != reference:
                boot = paired_bootstrap(_seed_mean_items(runs), ref_items, resamples=resamples)
                versus[name] = boot.__dict__
    return {"reference": reference, "recipes": rows, "versus_reference": versus}


def _recipe_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["seed"])
    tasks = list(runs[0]["scores"])
    per_task = {}
    for task in tasks:
        metric = runs[0]["scores"][task]["primary"]
        values = [r["scores"][task][metric] for r in runs]
        per_task[task] = {
            "metric": metric,
            "per_seed": values,
            **mean_ci(values).__dict__,
            "n": runs[0]["scores"][task]["n"],
        }
    macro = [float(np.mean([r["scores"][t][per_task[t]["metric"]] for t in tasks])) for r in runs]
    metrics = {t: per_task[t]["metric"] for t in tasks}
    groups = {}
    for name, members in task_groups(tasks).items():
        values = [group_score(r["scores"], members, metrics) for r in runs]
        groups[name] = {"tasks": members, "per_seed": values, **mean_ci(values).__dict__}
    return {
        "seeds": [r["seed"] for r in runs],
        "lr": runs[0]["lr"],
        "tasks": per_task,
        "groups": groups,
        "macro": {"per_seed": macro, **mean_ci(macro).__dict__},
        "trainable_params": runs[0]["trainable_params"],
        "costs": {k: float(np.mean([r["counters"][k] for r in runs])) for k in COST_KEYS},
    }


def _seed_mean_items(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per task, each test item's primary score averaged over the seeds (items aligned by id)."""
    out = {}
    for task, first in runs[0]["scores"].items():
        metric, ids = first["primary"], first["items"]["ids"]
        for r in runs[1:]:
            if r["scores"][task]["items"]["ids"] != ids:
                raise ValueError(f"{task}: the seeds were scored on different items; keep data.seed fixed")
        out[task] = np.mean([r["scores"][task]["items"][metric] for r in runs], axis=0).tolist()
    return out


def _pm(x: dict[str, float]) -> str:
    if math.isnan(x["low"]):
        return f"{x['mean']:.3f}"
    return f"{x['mean']:.3f} ± {(x['high'] - x['low']) / 2:.3f}"


def markdown(summary: dict[str, Any]) -> str:
    """The tables of ``compare.md``."""
    rows = summary["recipes"]
    first = next(iter(rows.values()))
    tasks, groups = list(first["tasks"]), first.get("groups", {})
    grouped = {t for g in groups.values() for t in g["tasks"]}
    columns = [*groups, *(t for t in tasks if t not in grouped)] if len(tasks) > WIDE else [*tasks, *groups]
    lines = [
        "Mean over seeds ± half-width of the 95% Student-t interval (primary metric per task; macro = mean over "
        "tasks"
        + (
            f"; {', '.join(groups)}: the mean over the group's items, in compare.json per task"
            if groups
            else ""
        )
        + ").",
        "",
        "| recipe | seeds | lr | "
        + " | ".join(columns)
        + " | macro | params | steps | samples | tokens | wall s |",
        "|---" * (len(columns) + 9) + "|",
    ]
    for name, row in rows.items():
        costs = row["costs"]
        cells = [_pm(row["groups"][c] if c in groups else row["tasks"][c]) for c in columns]
        lr = "-" if row["trainable_params"] == 0 and row["lr"] == 0 else f"{row['lr']:g}"  # the base row
        lines.append(
            f"| {name} | {len(row['seeds'])} | {lr} | " + " | ".join(cells) + f" | **{_pm(row['macro'])}** | "
            f"{row['trainable_params']:,} | {costs['optimizer_steps']:.0f} | {costs['samples']:.0f} | "
            f"{costs['tokens']:.0f} | {costs['wall_time_s']:.0f} |"
        )
    if summary["versus_reference"]:
        lines += [
            "",
            f"Against `{summary['reference']}` (paired bootstrap over the same test items, macro):",
            "",
        ]
        lines += ["| recipe | Δ macro | 95% CI | p |", "|---|---|---|---|"]
        for name, v in summary["versus_reference"].items():
            lines.append(
                f"| {name} | {v['diff']:+.3f} | [{v['low']:+.3f}, {v['high']:+.3f}] | {v['p_value']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot_scores(summary: dict[str, Any], path: Path) -> Path:
    """Bars of the macro score per recipe with the 95% interval as error bars."""
    names = list(summary["recipes"])
    macro = [summary["recipes"][n]["macro"] for n in names]
    errors = [0.0 if math.isnan(m["low"]) else (m["high"] - m["low"]) / 2 for m in macro]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    ax.bar(range(len(names)), [m["mean"] for m in macro], yerr=errors, capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("macro primary metric (mean over seeds, 95% CI)")
    ax.set_title("metalora compare")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_losses(results: list[dict[str, Any]], path: Path) -> Path:
    """Every run's training loss (one colour per recipe)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colours: dict[str, Any] = {}
    for r in sorted(results, key=lambda r: (r["recipe"], r["seed"])):
        if not r["losses"]:
            continue
        steps, losses = zip(*r["losses"], strict=True)
        colour = colours.setdefault(r["recipe"], f"C{len(colours)}")
        label = (
            r["recipe"]
            if r["seed"] == min(x["seed"] for x in results if x["recipe"] == r["recipe"])
            else None
        )
        ax.plot(steps, losses, color=colour, alpha=0.8, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_outputs(
    out: Path, study: dict[str, Any], results: list[dict[str, Any]], summary: dict[str, Any]
) -> Path:
    """``compare.json`` (study, summary, every run without its per-item scores), ``compare.md``, plots."""
    runs = [
        {**r, "scores": {t: {k: v for k, v in s.items() if k != "items"} for t, s in r["scores"].items()}}
        for r in results
    ]
    atomic.write_json(out / "compare.json", {"study": study, "summary": summary, "runs": runs})
    plot_scores(summary, out / "plots" / "scores.png")
    plot_losses(results, out / "plots" / "losses.png")
    body = markdown(summary) + "\n![scores](plots/scores.png)\n\n![training losses](plots/losses.png)\n"
    return atomic.write_text(out / "compare.md", "# metalora compare\n\n" + body)
