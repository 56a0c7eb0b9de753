"""``metalora compare RECIPE... [key=value ...]``: which method to use on these tasks, with error bars."""

from __future__ import annotations

import argparse

from metalora.compare import Study, compare
from metalora.compare.study import is_recipe
from metalora.compare.summary import markdown


def run(args: argparse.Namespace) -> None:
    recipes = [item for item in args.items if is_recipe(item)]
    overrides = [item for item in args.items if not is_recipe(item)]
    if not recipes:
        raise ValueError("give at least one recipe (a YAML file), e.g. metalora compare configs/lora_mt.yaml")
    study = Study(
        recipes=recipes,
        out=args.out,
        seeds=[int(s) for s in args.seeds.split(",") if s.strip()],
        overrides=overrides,
        tasks=args.tasks,
        split=args.split,
        shots=args.shots,
        limit=args.limit,
        jobs=args.jobs,
        lr_grid=[float(x) for x in args.lr_grid.split(",")] if args.lr_grid else None,
        reference=args.reference,
        base=args.base,
    )
    summary = compare(study, resamples=args.resamples)
    print(markdown(summary))
    print(f"written: {study.out / 'compare.json'}, {study.out / 'compare.md'}, {study.out / 'plots'}/")
