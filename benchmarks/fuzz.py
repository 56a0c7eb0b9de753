"""Fuzzed inputs, counted: run ``tests/test_fuzz_inputs.py`` with many examples per property and store how
many cases each property tried and how many failed.

    python benchmarks/fuzz.py --examples 1000     # about a minute; writes results/fuzz.json

The properties feed config files, overrides and task files (JSONL, CSV, Parquet) with malformed syntax,
wrong types, unknown keys, unicode, very long lines, empty fields, all-masked samples, duplicate ids and
task names with path separators; each case must end in correct behaviour or a one-line error naming the
file, line, field or key (see the test file). Counts come from hypothesis's own statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_fuzz_inputs.py"
PROPERTY = re.compile(r"^tests/test_fuzz_inputs\.py::(\S+):", re.M)
COUNTS = re.compile(r"(\d+) passing examples?, (\d+) failing examples?, (\d+) invalid examples?")


def run(examples: int) -> dict:
    env = {**os.environ, "METALORA_FUZZ_EXAMPLES": str(examples), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        str(TESTS),
        "--hypothesis-show-statistics",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=TESTS.parents[1])
    rows = []
    blocks = PROPERTY.split(proc.stdout)[1:]  # [name, block, name, block, ...]
    for name, block in zip(blocks[::2], blocks[1::2], strict=True):
        counts = [tuple(map(int, m)) for m in COUNTS.findall(block)]
        passing, failing, invalid = (sum(c[i] for c in counts) for i in range(3))
        rows.append({"property": name, "cases": passing + failing, "failing": failing, "invalid": invalid})
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"examples_per_property": examples, "rows": rows, "pytest": summary, "returncode": proc.returncode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1000, help="examples per property")
    p.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    p.add_argument(
        "--markdown", action="store_true", help="print the docs table from the stored JSON; run nothing"
    )
    args = p.parse_args()
    if args.markdown:
        stored = json.loads(args.out.read_text())
        print(table(stored["rows"], ["property", "cases", "failing", "invalid"]))
        print(f"| **total** | {stored['totals']['cases']} | {stored['totals']['failing']} | |")
        return
    result = run(args.examples) | {"machine": machine()}
    print(table(result["rows"], ["property", "cases", "failing", "invalid"]))
    total = sum(r["cases"] for r in result["rows"])
    failing = sum(r["failing"] for r in result["rows"])
    print(f"total: {total} cases, {failing} failing; pytest: {result['pytest']}")
    result["totals"] = {"cases": total, "failing": failing}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
