"""``metalora eval``: score a run, an adapter, a PEFT adapter or a base model against its base model."""

from __future__ import annotations

import argparse
from pathlib import Path

from metalora import atomic
from metalora.eval.targets import EvalSettings, eval_tasks_for, evaluate_target
from metalora.report import format_table, write_report
from metalora.rundir import RunDir


def run(args: argparse.Namespace) -> None:
    tasks, seed = eval_tasks_for(args.target, args.tasks, args.seed)
    unseen: str | int = int(args.unseen_task) if args.unseen_task.isdigit() else args.unseen_task
    settings = EvalSettings(
        split=args.split,
        shots=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        unseen_task=unseen,
        seed=seed,
    )
    record = evaluate_target(args.target, tasks, settings, base=args.base)
    print(format_table(record["after"], record["base"]))
    target = RunDir(args.target)
    out = Path(args.out) if args.out else (target.eval if target.root.is_dir() else Path("eval.json"))
    atomic.write_json(out, record)
    print(f"results written to {out}")
    if record["kind"].startswith("metalora") and out == target.eval and target.metrics.is_file():
        print(f"report: {write_report(target.root)}")
