"""``metalora compose``: LoRAHub. Weigh a library of LoRA adapters for a new task from k of its examples
and write the composition as a plain PEFT LoRA with its record (``metalora.compose``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from metalora.compose import LoRAHubConfig, compose, few_shot_batches, load_library, write_composition
from metalora.compose.library import LibraryAdapter
from metalora.data import Example, few_shot_pool
from metalora.eval.targets import eval_tasks_for
from metalora.models import load_base
from metalora.rundir import RunDir
from metalora.train.config import DataConfig


def run(args: argparse.Namespace) -> None:
    config = LoRAHubConfig(
        budget=args.budget,
        l1=args.l1,
        bound=args.bound,
        seed=args.seed,
        objective=args.objective,
        batch_size=args.batch_size,
    )
    task_name, examples, split_seed = _few_shot(args)
    library = load_library(args.library, base=args.model)
    settings = _data_settings(args)
    model_name = args.model or _library_base(library)
    model, tokenizer = load_base(model_name, device=args.device)
    batches = few_shot_batches(
        examples, tokenizer, config.batch_size, settings["max_length"], settings["template"]
    )
    composed, result = compose(model, library, batches, config)
    meta = {
        "task": task_name,
        "split": args.split,
        "seed": args.seed,
        "split_seed": split_seed,
        "example_ids": [ex.id for ex in examples],
        "model": model_name,
        **settings,
    }
    out = write_composition(composed, result, library, args.out, meta)
    for name, weight in result.weights.items():
        print(f"{weight:+.4f}  {name}")
    best, base_loss = result.best, result.to_dict()["base_loss"]
    at_zero = f" (w = 0: {base_loss:.4f})" if base_loss is not None else ""
    print(f"best: step {best.step} of {config.budget}, loss {best.loss:.4f}{at_zero}")
    print(f"PEFT LoRA adapter written to {out} (weights per step: {out / 'compose.md'})")


def _library_base(library: list[LibraryAdapter]) -> str:
    recorded = next((a.base_model for a in library if a.base_model), None)
    if recorded is None:
        raise ValueError("no library adapter records its base model; pass --model")
    return recorded


def _few_shot(args: argparse.Namespace) -> tuple[str, list[Example], int]:
    """(task name, the k examples, the split seed): k drawn with --seed from the task's --split."""
    tasks, split_seed = eval_tasks_for(args.library[0], args.task, args.data_seed)
    if len(tasks) != 1:
        raise ValueError(f"--task {args.task!r} names {len(tasks)} tasks; give exactly one")
    task = tasks[0]
    pool = getattr(task, args.split)
    if len(pool) < args.k:
        hint = " (an evaluation-only task: draw from --split dev or test)" if not task.train else ""
        raise ValueError(
            f"task {task.name!r}: its {args.split} split has {len(pool)} examples, fewer than --k {args.k}{hint}"
        )
    return task.name, few_shot_pool(pool, args.k, args.seed, task.name), split_seed


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """max_length and template: the options', else the first library run's ``data:``, else the defaults."""
    defaults = {f.name: f.default for f in fields(DataConfig)}
    recipe = RunDir(args.library[0]).read_config() or {}
    data = recipe.get("data") or {}
    return {
        "max_length": args.max_length or data.get("max_length", defaults["max_length"]),
        "template": args.template or data.get("template", defaults["template"]),
    }
