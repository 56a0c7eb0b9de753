"""The studies' tables for docs/benchmarks.md, from their stored results (nothing is trained here).

    python benchmarks/studies.py store mtl_table2 /work/studies/mtl_table2   # copy compare.json, .md, plots
    python benchmarks/studies.py markdown mtl_table2                          # the docs table
    python benchmarks/studies.py markdown mtl_table2_letter                   # runs stored one by one

A study is run by ``scripts/study_<name>.sh`` (``metalora compare``, resumable) into a directory outside the
repository (run directories hold adapters and checkpoints); ``store`` copies what the docs cite into
``results/studies/<name>/``: ``compare.json`` (every run's scores, costs and the summary), ``compare.md`` and
the plots. A study stopped midway can be stored from a ``metalora compare`` over its finished recipes.
``markdown`` prints ``metalora.compare.summary.markdown`` of the stored summary, or, for a directory of
single run results (``<recipe>-s<seed>.json``), summarises them without a reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from metalora.compare.summary import markdown, summarize  # noqa: E402

STUDIES = RESULTS / "studies"


def store(name: str, source: Path) -> Path:
    dest = STUDIES / name
    (dest / "plots").mkdir(parents=True, exist_ok=True)
    for file in ("compare.json", "compare.md"):
        shutil.copy2(source / file, dest / file)
    for png in (source / "plots").glob("*.png"):
        shutil.copy2(png, dest / "plots" / png.name)
    return dest


def table(name: str) -> str:
    folder = STUDIES / name
    if (folder / "compare.json").is_file():
        return markdown(json.loads((folder / "compare.json").read_text())["summary"])
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*-s*.json"))]
    return markdown(summarize(runs, reference=None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("store", help="copy a study's compare.json, compare.md and plots into results/")
    s.add_argument("name")
    s.add_argument("source", type=Path, help="the study's --out directory")
    m = sub.add_parser("markdown", help="print the docs table of a stored study")
    m.add_argument("name")
    args = p.parse_args()
    if args.command == "store":
        print(f"stored: {store(args.name, args.source)}")
    else:
        print(table(args.name))


if __name__ == "__main__":
    main()
