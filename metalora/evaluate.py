"""``metalora eval``: evaluate a model (base, metalora adapter, run, or PEFT adapter) on tasks, per task.

Multiple-choice tasks are scored by log-likelihood (``metalora.eval.multiple_choice``). The scored
continuation of option j is the same text the model is trained to produce for it, following the task's
``mc_response`` (``" B. <option>"`` for the default ``letter_text``, ``" B"`` for ``letter``, ``" <option>"``
for ``text``), so before/after numbers measure the trained behaviour on identical prompts. Generation tasks (GSM8K) use greedy decoding and exact match on the extracted answer.

Task-routed adapters (MTL-LoRA, MoELoRA) get each sample's task id by name. A task the adapter was not
trained on is routed by ``unseen_task``: ``"uniform"`` averages the option log-likelihoods over all trained
task ids (one pass per id: an ensemble of the per-task adapters), or a task name/id routes it to that task.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import metalora as ml
from metalora.data import Example, Task, TaskSpec, load_task
from metalora.data.templates import format_mc_response
from metalora.eval.generation import evaluate_generation
from metalora.eval.multiple_choice import evaluate_multiple_choice


@dataclass
class MCView:
    """An MC example whose options are rendered as the trained response text (``"B. <option>"``)."""

    prompt: str
    options: list[str]
    answer: int | None
    task: str
    id: str
    response: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def mc_view(ex: Example, style: str = "letter_text") -> MCView:
    """``ex`` with each option rendered as the task trains it (``style`` = the task's ``mc_response``)."""
    options = [format_mc_response(ex.options, j, style).lstrip() for j in range(len(ex.options))]
    return MCView(ex.prompt, options, ex.answer, ex.task, ex.id, ex.response, ex.meta)


def mc_style(task: Task) -> str:
    """How the task renders multiple choice as SFT (``letter_text``, ``letter`` or ``text``)."""
    return task.meta.get("spec", {}).get("mc_response", "letter_text")


def default_shots(task: Task) -> int:
    return 5 if task.name.startswith("mmlu") else 0


def _items(task: Task, split: str, limit: int | None) -> list[Example]:
    items = task.split(split)
    return items[:limit] if limit is not None else items


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[Task],
    split: str = "test",
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    unseen_task: str | int = "uniform",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per-task metrics: MC ``acc``/``acc_norm``; generation ``exact_match``; each with ``n``."""
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        items = _items(task, split, limit)
        k = default_shots(task) if shots is None else shots
        if task.meta.get("kind") == "gen":
            # generation has no per-option scores to average: an unseen task with "uniform" uses task id 0
            route = route_for(model, task.name, 0 if unseen_task == "uniform" else unseen_task)
            res = evaluate_generation(
                model,
                tokenizer,
                items,
                extractor="gsm8k",
                fewshot_pool={task.name: task.dev},
                num_fewshot=k,
                seed=seed,
                batch_size=batch_size,
                max_new_tokens=256,
                forward_context=route,
                progress=progress,
            )
            results[task.name] = {
                "primary": "exact_match",
                "exact_match": res.per_task[task.name]["exact_match"],
                "n": len(items),
            }
            continue
        style = mc_style(task)
        views = [mc_view(e, style) for e in items]
        pool = {task.name: [mc_view(e, style) for e in task.dev]}
        # cloze-style options differ in length: length-normalised accuracy is the meaningful one there
        primary = {"primary": "acc_norm" if style == "text" else "acc"}
        results[task.name] = primary | _evaluate_mc(
            model, tokenizer, task.name, views, pool, k, batch_size, unseen_task, seed, progress
        )
    return results


def _evaluate_mc(model, tokenizer, name, views, pool, k, batch_size, unseen_task, seed, progress):
    def run(route):
        return evaluate_multiple_choice(
            model,
            tokenizer,
            views,
            fewshot_pool=pool,
            num_fewshot=k,
            seed=seed,
            batch_size=batch_size,
            forward_context=route,
            progress=progress,
        )

    trained = ml.task_names(model) if ml.is_task_routed(model) else None
    if trained is None or name in trained or unseen_task != "uniform":
        res = run(route_for(model, name, unseen_task))
        stats = res.per_task[name]
        return {
            "acc": stats["acc"],
            "acc_norm": stats["acc_norm"],
            "n": len(views),
            **binary_metrics(views, [p.loglikelihoods for p in res.predictions]),
        }
    # uniform: average each option's log-likelihood over every trained task id
    per_id = [
        run(lambda names, t=t: ml.task_ids(model, [t] * len(names))).predictions for t in range(len(trained))
    ]
    correct = correct_norm = 0
    for j, view in enumerate(views):
        ll = np.mean([np.array(preds[j].loglikelihoods) for preds in per_id], axis=0)
        chars = np.array(per_id[0][j].num_chars, dtype=float)
        correct += int(np.argmax(ll) == view.answer)
        correct_norm += int(np.argmax(ll / chars) == view.answer)
    lls = [np.mean([preds[j].loglikelihoods for preds in per_id], axis=0) for j in range(len(views))]
    return {
        "acc": correct / len(views),
        "acc_norm": correct_norm / len(views),
        "n": len(views),
        **binary_metrics(views, lls),
    }


def binary_metrics(views: list[MCView], loglikelihoods: list) -> dict[str, float]:
    """For two-option tasks (BoolQ, RTE, MRPC, SST-2, ...): F1 and MCC of the argmax prediction (option
    index 1 = positive class), and AUC-ROC of the score LL(option 1) − LL(option 0). Empty otherwise, or
    where a metric is undefined on these items (a single class)."""
    from metalora.eval.metrics import auc_roc, f1, matthews_corrcoef

    if not views or any(len(v.options) != 2 or v.answer is None for v in views):
        return {}
    gold = [v.answer for v in views]
    margin = [float(ll[1] - ll[0]) for ll in loglikelihoods]
    pred = [int(m > 0) for m in margin]
    out: dict[str, float] = {}
    for name, fn, arg in (("f1", f1, pred), ("mcc", matthews_corrcoef, pred), ("auc_roc", auc_roc, margin)):
        try:
            out[name] = float(fn(gold, arg))
        except ValueError:  # e.g. only one class among the gold answers
            continue
    return out


def route_for(model: nn.Module, name: str, unseen_task: str | int):
    """forward_context routing every row to task ``name`` (or ``unseen_task`` if it was not trained); None
    for adapters that do not route by task."""
    trained = ml.task_names(model) if ml.is_task_routed(model) else None
    if trained is None:
        return None
    target = name if name in trained else unseen_task
    return lambda names: ml.task_ids(model, [target] * len(names))


def load_eval_target(target: str, base: str | None = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) for a run dir, a metalora adapter dir, a PEFT adapter dir, or a base name."""
    from metalora.adapters.io import read_adapter_record
    from metalora.export import adapter_dir
    from metalora.models import load_base

    path = Path(target)
    if (path / "adapter_config.json").is_file():  # a PEFT adapter
        import peft

        cfg = json.loads((path / "adapter_config.json").read_text())
        base_name = base or cfg.get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; pass --base")
        model, tok = load_base(base_name)
        return peft.PeftModel.from_pretrained(model, str(path)).eval(), tok, "peft"
    if path.exists():
        directory = adapter_dir(path)
        base_name = base or read_adapter_record(directory).get("base_model")
        model, tok = load_base(base_name)
        return ml.load_adapter(model, directory).eval(), tok, "metalora"
    model, tok = load_base(target)
    return model.eval(), tok, "base"


def base_name_of(target: str) -> str:
    """The base model a target was trained from (the target itself for a base model name)."""
    from metalora.adapters.io import read_adapter_record
    from metalora.export import adapter_dir

    path = Path(target)
    if (path / "adapter_config.json").is_file():
        return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    if path.exists():
        return read_adapter_record(adapter_dir(path))["base_model"]
    return target


def format_table(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]] | None = None
) -> str:
    lines = ["| task | n | metric | base | adapted | Δ |", "|---|---|---|---|---|---|"]
    for name, stats in after.items():
        metric = stats.get("primary", "exact_match" if "exact_match" in stats else "acc")
        b = before[name][metric] if before else float("nan")
        lines.append(
            f"| {name} | {stats['n']} | {metric} | {b:.3f} | {stats[metric]:.3f} | {stats[metric] - b:+.3f} |"
        )
    return "\n".join(lines)


def evaluate_cli(args: argparse.Namespace) -> None:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = [load_task(TaskSpec(name=n), seed=args.seed) for n in names]
    unseen: str | int = int(args.unseen_task) if args.unseen_task.isdigit() else args.unseen_task
    model, tok, kind = load_eval_target(args.target, args.base)
    kwargs = dict(
        split=args.split, shots=args.shots, limit=args.limit, batch_size=args.batch_size, seed=args.seed
    )
    with torch.no_grad():
        after = evaluate_tasks(model, tok, tasks, unseen_task=unseen, **kwargs)
        before = None
        if kind != "base":
            from metalora.models import load_base

            base_model, base_tok = load_base(args.base or base_name_of(args.target))
            before = evaluate_tasks(base_model.eval(), base_tok, tasks, **kwargs)
    print(format_table(after, before))
    out = (
        Path(args.out)
        if args.out
        else (Path(args.target) / "eval.json" if Path(args.target).is_dir() else Path("eval.json"))
    )
    from metalora import atomic

    atomic.write_json(
        out,
        {
            "target": args.target,
            "kind": kind,
            "split": args.split,
            "seed": args.seed,
            "after": after,
            "base": before,
        },
    )
    print(f"results written to {out}")
    if kind == "metalora" and out.parent == Path(args.target) and (out.parent / "metrics.jsonl").is_file():
        from metalora.report import write_report

        print(f"report: {write_report(out.parent)}")
