"""``metalora select METHOD``: the data-selection baselines (BM25, DSIR, classifier, MIX) on JSONL files."""

from __future__ import annotations

import argparse
from pathlib import Path

from metalora.select import select_jsonl


def run(args: argparse.Namespace) -> None:
    for path in (args.candidates, args.target):
        if not Path(path).is_file():
            raise FileNotFoundError(f"file not found: {path}")
    summary = select_jsonl(
        args.method,
        args.candidates,
        args.target,
        args.out,
        k=args.k,
        ratio=args.ratio,
        seed=args.seed,
        text_fields=args.text_fields.split(",") if args.text_fields else None,
    )
    print(summary)
