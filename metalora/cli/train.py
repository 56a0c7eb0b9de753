"""``metalora train CONFIG [key=value ...]``: one run from a recipe, then its report."""

from __future__ import annotations

import argparse

from metalora.report import write_report
from metalora.train.runner import run as run_recipe


def run(args: argparse.Namespace) -> None:
    run_dir = run_recipe(args.config, overrides=args.overrides)
    report = write_report(run_dir)
    print(f"run directory: {run_dir}\nreport: {report}")
