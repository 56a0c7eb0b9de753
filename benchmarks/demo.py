"""The demo's numbers for docs/benchmarks.md: run ``metalora demo`` and store what it measured.

    python benchmarks/demo.py             # the full demo (about 15 minutes on 2 idle cores)
    python benchmarks/demo.py --markdown  # the docs table from the stored results/demo.json

Runs the demo into ``--work-dir`` (a finished run is resumed, i.e. reused), then stores its ``eval.json``
(adapted and base model on the same held-out items), ``counters.json`` and the recipe in
``results/demo.json``. The demo's recipe is ``configs/demo.yaml``; its seeds make the run repeatable bit for
bit (tests/test_reproducibility.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from metalora.cli.demo import run_demo  # noqa: E402
from metalora.report import format_table  # noqa: E402
from metalora.rundir import RunDir  # noqa: E402

STORE = RESULTS / "demo.json"


def measure(work_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = RunDir(run_demo(out_dir=work_dir / "demo"))
    return {
        "eval": json.loads(run.eval.read_text()),
        "counters": json.loads(run.counters.read_text()),
        "config": run.read_config(),
        "wall_s": time.perf_counter() - t0,
        "machine": machine(),
    }


def markdown(result: dict[str, Any]) -> str:
    ev, c = result["eval"], result["counters"]
    line = (
        f"{c['samples']:,} samples, {c['tokens']:,} tokens, {c['optimizer_steps']} optimizer steps; "
        f"{result['wall_s']:.0f} s end to end ({result['machine']['threads']} thread); "
        f"{ev['limit']} held-out test items per task, split seed {ev['seed']}."
    )
    return line + "\n\n" + format_table(ev["after"], ev["base"]).replace("| adapted |", "| MeTA-LoRA |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="print the docs table from the stored JSON")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/metalora_demo_bench"))
    args = p.parse_args()
    if not args.markdown:
        result = measure(args.work_dir)
        STORE.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {STORE}")
    print(markdown(json.loads(STORE.read_text())))


if __name__ == "__main__":
    main()
