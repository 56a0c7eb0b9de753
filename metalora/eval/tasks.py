"""Scoring tasks: a model (base or adapted) on built-in or file tasks, per task.

Multiple-choice tasks are scored by log-likelihood (``metalora.eval.multiple_choice``). The scored
continuation of option j is the same text the model is trained to produce for it, following the task's
``mc_response`` (``" B. <option>"`` for the default ``letter_text``, ``" B"`` for ``letter``, ``" <option>"``
for ``text`` and ``cloze``, whose prompt lists no options), so before/after numbers measure the trained
behaviour on identical prompts. Generation tasks
(GSM8K) use greedy decoding and exact match on the extracted answer; when every gold answer is a number
they also get Pearson r (``regression_metrics``). A task may fix its own protocol in
``task.meta["eval"]`` (BBH: lm-eval's 3-shot exemplars in order, its description, options "(A)"…).

Task-routed adapters (MTL-LoRA, MoELoRA) get each sample's task id by name. A task the adapter was not
trained on is routed by ``unseen_task``: ``"uniform"`` averages the option log-likelihoods over all trained
task ids (one pass per id: an ensemble of the per-task adapters), or a task name/id routes it to that task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from metalora.adapters import is_task_routed, task_ids, task_names
from metalora.data import Example, Task
from metalora.data.templates import format_mc_response
from metalora.eval.extract import normalize_number
from metalora.eval.generation import evaluate_generation
from metalora.eval.metrics import auc_roc, f1, matthews_corrcoef, pearson
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
    per_item: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per-task metrics: MC ``acc``/``acc_norm``; generation ``exact_match``; each with ``n``.

    ``per_item``: also ``items``, each item's id and 0/1 score under every accuracy metric (the paired
    bootstrap of ``metalora compare`` resamples them)."""
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
            results[task.name] = _evaluate_gen(
                model, tokenizer, task, items, k, batch_size, unseen_task, seed, progress, protocol
            )
        else:
            results[task.name] = _evaluate_task_mc(
                model, tokenizer, task, items, k, batch_size, unseen_task, seed, progress, protocol
            )
        scored = results[task.name].pop("items")
        if per_item:
            results[task.name]["items"] = scored
    return results


def _evaluate_gen(model, tokenizer, task, items, k, batch_size, unseen_task, seed, progress, protocol):
    settings = task.meta.get("eval", {})
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
    return {
        "primary": "exact_match",
        "exact_match": res.per_task[task.name]["exact_match"],
        "n": len(items),
        **regression_metrics(res.predictions),
        "items": {
            "ids": [p.id for p in res.predictions],
            "exact_match": [int(p.correct) for p in res.predictions],
        },
    }


def _evaluate_task_mc(model, tokenizer, task, items, k, batch_size, unseen_task, seed, progress, protocol):
    settings = task.meta.get("eval", {})
    style = mc_style(task)
    views = [mc_view(e, style) for e in items]
    pool = {task.name: [mc_view(e, style) for e in task.dev]}
    # cloze-style options differ in length: length-normalised accuracy is the meaningful one there
    primary = {"primary": settings.get("primary", "acc_norm" if style in ("text", "cloze") else "acc")}
    return primary | _evaluate_mc(
        model, tokenizer, task.name, views, pool, k, batch_size, unseen_task, seed, progress, protocol
    )


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

    trained = task_names(model) if is_task_routed(model) else None
    if trained is None or name in trained or unseen_task != "uniform":
        res = run(route_for(model, name, unseen_task))
        stats = res.per_task[name]
        preds = res.predictions
        return {
            "acc": stats["acc"],
            "acc_norm": stats["acc_norm"],
            "n": len(views),
            **binary_metrics(views, [p.loglikelihoods for p in preds]),
            "items": _mc_items(views, [p.pred for p in preds], [p.pred_norm for p in preds]),
        }
    # uniform: average each option's log-likelihood over every trained task id
    per_id = [
        run(lambda names, t=t: task_ids(model, [t] * len(names))).predictions for t in range(len(trained))
    ]
    lls = [
        np.mean([np.array(preds[j].loglikelihoods) for preds in per_id], axis=0) for j in range(len(views))
    ]
    chars = [np.array(per_id[0][j].num_chars, dtype=float) for j in range(len(views))]
    items = _mc_items(
        views,
        [int(np.argmax(ll)) for ll in lls],
        [int(np.argmax(ll / c)) for ll, c in zip(lls, chars, strict=True)],
    )
    return {
        "acc": sum(items["acc"]) / len(views),
        "acc_norm": sum(items["acc_norm"]) / len(views),
        "n": len(views),
        **binary_metrics(views, lls),
        "items": items,
    }


def _mc_items(views: list[MCView], pred: list[int], pred_norm: list[int]) -> dict[str, list]:
    """Each item's id and 0/1 correctness under ``acc`` and ``acc_norm``."""
    return {
        "ids": [v.id for v in views],
        "acc": [int(p == v.answer) for v, p in zip(views, pred, strict=True)],
        "acc_norm": [int(p == v.answer) for v, p in zip(views, pred_norm, strict=True)],
    }


def binary_metrics(views: list[MCView], loglikelihoods: list) -> dict[str, float]:
    """For two-option tasks (BoolQ, RTE, MRPC, SST-2, ...): F1 and MCC of the argmax prediction (option
    index 1 = positive class), and AUC-ROC of the score LL(option 1) − LL(option 0). Empty otherwise, or
    where a metric is undefined on these items (a single class)."""
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
    trained = task_names(model) if is_task_routed(model) else None
    if trained is None:
        return None
    target = name if name in trained else unseen_task
    return lambda names: task_ids(model, [target] * len(names))
