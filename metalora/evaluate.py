"""``metalora eval``: evaluate a model (base, metalora adapter, run, or PEFT adapter) on tasks, per task.

Multiple-choice tasks are scored by log-likelihood (``metalora.eval.multiple_choice``). The scored
continuation of option j is the same text the model is trained to produce for it, following the task's
``mc_response`` (``" B. <option>"`` for the default ``letter_text``, ``" B"`` for ``letter``, ``" <option>"``
for ``text``), so before/after numbers measure the trained behaviour on identical prompts. Generation tasks
(GSM8K) use greedy decoding and exact match on the extracted answer; when every gold answer is a number
they also get Pearson r (``regression_metrics``). A task may fix its own protocol in
``task.meta["eval"]`` (BBH: lm-eval's 3-shot exemplars in order, its description, options "(A)"…).

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
import yaml
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
    """How the task renders multiple choice as SFT (``letter_text``, ``letter`` or ``text``); a task with
    fixed evaluation settings (BBH: options are the answers themselves) overrides the spec."""
    fixed = task.meta.get("eval", {}).get("mc_response")
    return fixed or task.meta.get("spec", {}).get("mc_response", "letter_text")


def default_shots(task: Task) -> int:
    """The benchmark's own shot count: MMLU 5 (from dev), BBH 3 (lm-eval's exemplars), otherwise 0."""
    if "shots" in task.meta.get("eval", {}):
        return int(task.meta["eval"]["shots"])
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
        settings = task.meta.get("eval", {})
        protocol = {
            "fewshot_sampler": settings.get("fewshot_sampler", "first_n"),
            "description": settings.get("description", ""),
        }
        if task.meta.get("kind") == "gen":
            # generation has no per-option scores to average: an unseen task with "uniform" uses task id 0
            route = route_for(model, task.name, 0 if unseen_task == "uniform" else unseen_task)
            res = evaluate_generation(
                model,
                tokenizer,
                items,
                extractor=settings.get("extractor", "gsm8k"),
                fewshot_pool={task.name: task.dev},
                num_fewshot=k,
                seed=seed,
                batch_size=batch_size,
                stop=tuple(settings.get("stop", ("\n\n",))),
                max_new_tokens=int(settings.get("max_new_tokens", 256)),
                forward_context=route,
                **protocol,
                progress=progress,
            )
            results[task.name] = {
                "primary": "exact_match",
                "exact_match": res.per_task[task.name]["exact_match"],
                "n": len(items),
                **regression_metrics(res.predictions),
            }
            continue
        style = mc_style(task)
        views = [mc_view(e, style) for e in items]
        pool = {task.name: [mc_view(e, style) for e in task.dev]}
        # cloze-style options differ in length: length-normalised accuracy is the meaningful one there
        primary = {"primary": settings.get("primary", "acc_norm" if style == "text" else "acc")}
        results[task.name] = primary | _evaluate_mc(
            model, tokenizer, task.name, views, pool, k, batch_size, unseen_task, seed, progress, protocol
        )
    return results


def _evaluate_mc(model, tokenizer, name, views, pool, k, batch_size, unseen_task, seed, progress, protocol):
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
            **protocol,
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


def regression_metrics(predictions: list) -> dict[str, float]:
    """For generation tasks whose gold answers are all numbers (STS-B-style scores, counts): Pearson r
    between predicted and gold numbers over the items whose prediction is a number, and the fraction of
    items that parsed (``parsed``; the others are left out of r, not scored as 0). Empty when a gold answer
    is not a number or r is undefined (fewer than 2 parsed items, or one side constant)."""
    from metalora.eval.extract import normalize_number
    from metalora.eval.metrics import pearson

    golds = [normalize_number(p.gold) if p.gold else None for p in predictions]
    if not predictions or any(g is None for g in golds):
        return {}
    pairs = [
        (float(x), float(g))
        for p, g in zip(predictions, golds, strict=True)
        if p.prediction is not None and (x := normalize_number(p.prediction)) is not None
    ]
    out = {"parsed": len(pairs) / len(predictions)}
    try:
        out["pearson"] = float(pearson([x for x, _ in pairs], [g for _, g in pairs]))
    except ValueError:
        pass
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
        from metalora.export import task_adapters

        per_task = task_adapters(path)
        return read_adapter_record(next(iter(per_task.values()), None) or adapter_dir(path))["base_model"]
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


def eval_tasks_for(target: str, tasks_arg: str | None, seed: int | None) -> tuple[list[Task], int]:
    """The tasks to evaluate and the split seed.

    ``--tasks`` is comma-separated: built-in names, the run's own task names, and YAML/JSON files holding
    a task spec, a list of them, ``{tasks: [...]}`` or a whole run recipe. By default, a run directory's
    own ``data.tasks`` and ``data.seed`` from its ``config.yaml`` (so a run is scored on the held-out
    split of the data it was trained on)."""
    config_file = Path(target) / "config.yaml"
    run_data = yaml.safe_load(config_file.read_text())["data"] if config_file.is_file() else None
    seed = seed if seed is not None else int(run_data["seed"]) if run_data else 0
    if tasks_arg is None:
        if run_data is None:
            raise ValueError(f"--tasks is required: {target} is not a run directory with a config.yaml")
        return [load_task(spec, seed=seed) for spec in run_data["tasks"]], seed
    run_specs = {spec.name: spec for spec in map(TaskSpec.coerce, run_data["tasks"] if run_data else [])}
    specs: list[Any] = []
    for item in (t.strip() for t in tasks_arg.split(",")):
        if not item:
            continue
        path = Path(item)
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            loaded = yaml.safe_load(path.read_text())  # JSON is YAML
            if isinstance(loaded, dict) and isinstance(loaded.get("data"), dict):  # a run recipe
                loaded = loaded["data"].get("tasks") or []
            elif isinstance(loaded, dict) and "tasks" in loaded:
                loaded = loaded["tasks"]
            specs += loaded if isinstance(loaded, list) else [loaded]
        elif path.suffix in (".yaml", ".yml", ".json"):
            raise FileNotFoundError(f"--tasks: task spec file {path} not found")
        else:  # one of the run's own tasks (its spec, e.g. a file), else a built-in name
            specs.append(run_specs.get(item, TaskSpec(name=item)))
    return [load_task(spec, seed=seed) for spec in specs], seed


def evaluate_cli(args: argparse.Namespace) -> None:
    from metalora.export import task_adapters

    tasks, seed = eval_tasks_for(args.target, args.tasks, args.seed)
    unseen: str | int = int(args.unseen_task) if args.unseen_task.isdigit() else args.unseen_task
    kwargs = dict(split=args.split, shots=args.shots, limit=args.limit, batch_size=args.batch_size, seed=seed)
    per_task = task_adapters(args.target)
    with torch.no_grad():
        if per_task:  # LoRA-ST: each task with its own adapter
            missing = [t.name for t in tasks if t.name not in per_task]
            if missing:
                raise ValueError(
                    f"{args.target} is a LoRA-ST run with adapters for {', '.join(per_task)}; "
                    f"none for {', '.join(missing)}"
                )
            after, kind = {}, "metalora_st"
            for task in tasks:
                model, tok, _ = load_eval_target(str(per_task[task.name]), args.base)
                after |= evaluate_tasks(model, tok, [task], unseen_task=unseen, **kwargs)
        else:
            model, tok, kind = load_eval_target(args.target, args.base)
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
            "seed": seed,
            "after": after,
            "base": before,
        },
    )
    print(f"results written to {out}")
    if (
        kind.startswith("metalora")
        and out.parent == Path(args.target)
        and (out.parent / "metrics.jsonl").is_file()
    ):
        from metalora.report import write_report

        print(f"report: {write_report(out.parent)}")
