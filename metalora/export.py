"""``metalora export``: a saved adapter (or a run's) to a PEFT LoRA directory and/or a merged HF model."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from metalora.adapters import load_adapter
from metalora.adapters.io import CONFIG_FILE, read_adapter_record
from metalora.adapters.merge import export_peft, merge


def adapter_dir(source: str | Path) -> Path:
    """The adapter directory of a run directory (``runs/NAME/adapter``) or the directory itself."""
    source = Path(source)
    if (source / CONFIG_FILE).is_file():
        return source
    if (source / "adapter" / CONFIG_FILE).is_file():
        return source / "adapter"
    raise FileNotFoundError(
        f"{source} is neither a metalora adapter directory nor a run directory with adapter/"
    )


def load_adapted(source: str | Path, base: str | None = None) -> nn.Module:
    """The base model recorded with the adapter (or ``base``), with the adapter loaded."""
    from metalora.models import load_base

    directory = adapter_dir(source)
    record = read_adapter_record(directory)
    base_name = base or record.get("base_model")
    if not base_name:
        raise ValueError(f"{directory}: the adapter records no base model; pass --base")
    model, _ = load_base(base_name)
    return load_adapter(model, directory)


def export_cli(args: argparse.Namespace) -> None:
    if not args.peft and not args.merge:
        raise ValueError("nothing to do: give --peft DIR and/or --merge DIR")
    model = load_adapted(args.source, args.base)
    task = int(args.task) if args.task is not None and args.task.isdigit() else args.task
    if args.peft:
        export_peft(model, args.peft, task=task)
        print(f"PEFT LoRA adapter written to {args.peft}")
    if args.merge:
        merged = merge(model, task=task, inplace=True)
        merged.save_pretrained(args.merge, safe_serialization=True)
        print(f"merged model written to {args.merge}")
