"""``metalora export``: a saved adapter (or a run's) to a PEFT LoRA directory and/or a merged HF model."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from metalora.adapters import load_adapter
from metalora.adapters.io import CONFIG_FILE, read_adapter_record
from metalora.adapters.merge import export_peft, merge


def task_adapters(run_dir: str | Path) -> dict[str, Path]:
    """``{task: adapter directory}`` of a LoRA-ST run (``runs/NAME/tasks/<task>/adapter``); empty for
    anything else, including a run with one shared ``adapter/``."""
    root = Path(run_dir) / "tasks"
    if not root.is_dir() or (Path(run_dir) / "adapter" / CONFIG_FILE).is_file():
        return {}
    return {p.parent.name: p for p in sorted(root.glob("*/adapter")) if (p / CONFIG_FILE).is_file()}


def adapter_dir(source: str | Path, task: str | None = None) -> Path:
    """The adapter directory of a run directory (``runs/NAME/adapter``; for a LoRA-ST run, ``task``'s
    ``runs/NAME/tasks/<task>/adapter``) or the directory itself."""
    source = Path(source)
    if (source / CONFIG_FILE).is_file():
        return source
    if (source / "adapter" / CONFIG_FILE).is_file():
        return source / "adapter"
    per_task = task_adapters(source)
    if per_task:
        if task in per_task:
            return per_task[task]
        problem = "pass --task NAME" if task is None else f"it has no adapter for task {task!r}"
        raise FileNotFoundError(
            f"{source} is a LoRA-ST run with one adapter per task ({', '.join(per_task)}): {problem}"
        )
    raise FileNotFoundError(
        f"{source} is neither a metalora adapter directory nor a run directory with adapter/ "
        "(or tasks/<task>/adapter/ for LoRA-ST)"
    )


def load_adapted(source: str | Path, base: str | None = None, task: str | None = None) -> nn.Module:
    """The base model recorded with the adapter (or ``base``), with the adapter loaded (a LoRA-ST run's:
    ``task``'s)."""
    from metalora.models import load_base

    directory = adapter_dir(source, task)
    record = read_adapter_record(directory)
    base_name = base or record.get("base_model")
    if not base_name:
        raise ValueError(f"{directory}: the adapter records no base model; pass --base")
    model, _ = load_base(base_name)
    return load_adapter(model, directory)


def export_cli(args: argparse.Namespace) -> None:
    if not args.peft and not args.merge:
        raise ValueError("nothing to do: give --peft DIR and/or --merge DIR")
    if task_adapters(args.source):
        # LoRA-ST: --task picks the task's own adapter, a plain LoRA
        model, task = load_adapted(args.source, args.base, args.task), None
    else:
        model = load_adapted(args.source, args.base)
        task = int(args.task) if args.task is not None and args.task.isdigit() else args.task
    if args.peft:
        export_peft(model, args.peft, task=task)
        print(f"PEFT LoRA adapter written to {args.peft}")
    if args.merge:
        merged = merge(model, task=task, inplace=True)
        merged.save_pretrained(args.merge, safe_serialization=True)
        print(f"merged model written to {args.merge}")
