"""Evaluating a *target*: a run directory, a metalora adapter directory, a PEFT adapter directory or a base
model name, against its base model on the same prompts.

``evaluate_target`` is the one evaluation routine of ``metalora eval`` and the demo; its record is what
both write as the run's ``eval.json``:

    {"target", "kind", "split", "seed", "shots", "limit", "after": {task: metrics}, "base": {task: metrics} | null}

``kind`` is ``metalora`` (a metalora adapter or run), ``metalora_st`` (a LoRA-ST run: each task scored with
its own adapter), ``peft`` or ``base`` (no adapter: ``base`` is null).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import yaml
from torch import nn

from metalora.adapters import load_adapter
from metalora.adapters.io import read_adapter_record
from metalora.data import Task, TaskSpec, load_task
from metalora.eval.tasks import evaluate_tasks
from metalora.models import load_base
from metalora.rundir import RunDir, adapter_dir, task_adapters

PEFT_CONFIG = "adapter_config.json"  # PEFT's own file name


@dataclass
class EvalSettings:
    """How to score: the split, shots (None: each benchmark's own), items per task, batch, routing, seed."""

    split: str = "test"
    shots: int | None = None
    limit: int | None = None
    batch_size: int = 8
    unseen_task: str | int = "uniform"
    seed: int = 0
    progress: bool = True
    per_item: bool = False
    """Also record each item's 0/1 scores (``evaluate_tasks(per_item=True)``)."""


def load_eval_target(target: str | Path, base: str | None = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) for a run dir, a metalora adapter dir, a PEFT adapter dir, or a base name."""
    path = Path(target)
    if (path / PEFT_CONFIG).is_file():
        cfg = json.loads((path / PEFT_CONFIG).read_text())
        base_name = base or cfg.get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path}/{PEFT_CONFIG} names no base_model_name_or_path; pass --base")
        model, tok = load_base(base_name)
        return peft.PeftModel.from_pretrained(model, str(path)).eval(), tok, "peft"
    if path.exists() and not _is_model_folder(path):
        directory = adapter_dir(path)
        record = read_adapter_record(directory)
        # a QLoRA adapter is scored over the quantized base it was trained on
        model, tok = load_base(base or record.get("base_model"), quantization=record.get("base_quantization"))
        return load_adapter(model, directory).eval(), tok, "metalora"
    model, tok = load_base(str(target))
    return model.eval(), tok, "base"


def _is_model_folder(path: Path) -> bool:
    """A local Hugging Face model folder (its ``config.json``), i.e. a base model given by path."""
    return (path / "config.json").is_file()


def base_name_of(target: str | Path) -> str:
    """The base model a target was trained from (the target itself for a base model name)."""
    path = Path(target)
    if (path / PEFT_CONFIG).is_file():
        return json.loads((path / PEFT_CONFIG).read_text())["base_model_name_or_path"]
    if path.exists() and not _is_model_folder(path):
        per_task = task_adapters(path)
        return read_adapter_record(next(iter(per_task.values()), None) or adapter_dir(path))["base_model"]
    return str(target)


def evaluate_target(
    target: str | Path, tasks: list[Task], settings: EvalSettings, base: str | None = None
) -> dict[str, Any]:
    """Score ``target`` and (unless it is a base model) its base model on ``tasks``: the eval.json record."""
    after, kind = evaluate_adapted(target, tasks, settings, base)
    before = None
    if kind != "base":
        with torch.no_grad():
            base_model, base_tok = load_base(base or base_name_of(target))
            before = evaluate_tasks(base_model.eval(), base_tok, tasks, **_task_kwargs(settings))
    record = {"target": str(target), "kind": kind, "split": settings.split, "seed": settings.seed}
    return record | {"shots": settings.shots, "limit": settings.limit, "after": after, "base": before}


def evaluate_adapted(
    target: str | Path, tasks: list[Task], settings: EvalSettings, base: str | None = None
) -> tuple[dict[str, dict[str, Any]], str]:
    """(per-task scores, kind) of ``target`` alone; a LoRA-ST run scores each task with its own adapter."""
    kwargs = _task_kwargs(settings)
    per_task = task_adapters(target)
    with torch.no_grad():
        if not per_task:
            model, tok, kind = load_eval_target(target, base)
            return evaluate_tasks(model, tok, tasks, unseen_task=settings.unseen_task, **kwargs), kind
        missing = [t.name for t in tasks if t.name not in per_task]
        if missing:
            raise ValueError(
                f"{target} is a LoRA-ST run with adapters for {', '.join(per_task)}; none for {', '.join(missing)}"
            )
        after: dict[str, dict[str, Any]] = {}
        for task in tasks:
            model, tok, _ = load_eval_target(per_task[task.name], base)
            after |= evaluate_tasks(model, tok, [task], unseen_task=settings.unseen_task, **kwargs)
    return after, "metalora_st"


def _task_kwargs(settings: EvalSettings) -> dict[str, Any]:
    kwargs = asdict(settings)
    kwargs.pop("unseen_task")
    return kwargs


def eval_tasks_for(target: str | Path, tasks_arg: str | None, seed: int | None) -> tuple[list[Task], int]:
    """The tasks to evaluate and the split seed.

    ``tasks_arg`` is comma-separated: built-in names, the run's own task names, and YAML/JSON files holding
    a task spec, a list of them, ``{tasks: [...]}`` or a whole run recipe. By default, a run directory's
    own ``data.tasks`` and ``data.seed`` from its ``config.yaml`` (so a run is scored on the held-out
    split of the data it was trained on)."""
    recipe = RunDir(target).read_config()
    run_data = recipe["data"] if recipe else None
    seed = seed if seed is not None else int(run_data["seed"]) if run_data else 0
    if tasks_arg is None:
        if run_data is None:
            raise ValueError(f"--tasks is required: {target} is not a run directory with a config.yaml")
        return [load_task(spec, seed=seed) for spec in run_data["tasks"]], seed
    run_specs = {spec.name: spec for spec in map(TaskSpec.coerce, run_data["tasks"] if run_data else [])}
    specs: list[Any] = []
    for item in (t.strip() for t in tasks_arg.split(",")):
        if item:
            specs += _specs_from_item(item, run_specs)
    return [load_task(spec, seed=seed) for spec in specs], seed


def _specs_from_item(item: str, run_specs: dict[str, TaskSpec]) -> list[Any]:
    path = Path(item)
    if path.suffix not in (".yaml", ".yml", ".json"):  # one of the run's own tasks, else a built-in name
        return [run_specs.get(item, TaskSpec(name=item))]
    if not path.is_file():
        raise FileNotFoundError(f"--tasks: task spec file {path} not found")
    loaded = yaml.safe_load(path.read_text())  # JSON is YAML
    if isinstance(loaded, dict) and isinstance(loaded.get("data"), dict):  # a run recipe
        loaded = loaded["data"].get("tasks") or []
    elif isinstance(loaded, dict) and "tasks" in loaded:
        loaded = loaded["tasks"]
    return loaded if isinstance(loaded, list) else [loaded]
