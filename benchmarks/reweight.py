"""META-LoRA reweighting with real built-in data: memory, step time, noisy labels, the probe, Table 2.

On SmolLM2-135M, or the model named by ``--model`` (an embedded name, HF name or path). Each experiment is
a file of its own, runnable alone with the same options; this script runs several in one process:

    python benchmarks/reweight.py [--parts a,b,c,probe,d] [--seeds 0,1]
    python benchmarks/reweight.py --markdown [--parts ...]   # the doc's tables from results/reweight.json

(a) ``reweight_memory.py``: peak memory of one reweighting step over one plain LoRA step;
(b) ``reweight_time.py``: step time against plain LoRA and the floor, and the agreement of the low-rank and
    dense scores with exact per-sample-gradient scores;
(c) ``reweight_noisy_labels.py``: 30% wrong answers; AUC of the learned weights, accuracy vs plain LoRA;
(probe) ``reweight_probe.py``: exact per-sample gradients against the validation directions on (c)'s data;
(d) ``reweight_table2.py``: a mixed pool, reweighting against the selection baselines.

The settings in ``docs/benchmarks.md`` were run with, besides the defaults:
    --parts c --c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40 --c-epochs 2
    --parts probe --c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40
    --parts d --d-target sst2 --d-pool sst2,siqa,piqa,boolq --d-per-task 40 --d-k 40 --d-steps 20 --lr 5e-4
        --d-mc-style text

    (c) and the probe again with --model gemma3-270m (keys get the model's name)
    (c) with our validation-direction options: the first line plus --c-val-batch 8 (and 32) --score cosine
        --val-balance answer --shared-direction remove; its control: --c-val-batch 8 alone

Scale (2 shared CPU cores): LoRA r=16 on q,k,v,o, sequences ≤ 128 tokens, tens of steps. Prints tables,
merges its results into ``benchmarks/results/reweight.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reweight_memory  # noqa: E402
import reweight_noisy_labels  # noqa: E402
import reweight_probe  # noqa: E402
import reweight_table2  # noqa: E402
import reweight_time  # noqa: E402
from common import generated  # noqa: E402
from reweight_common import RESULTS_FILE, add_shared_arguments, apply_model, save_results  # noqa: E402

EXPERIMENTS = {
    "a": reweight_memory,
    "b": reweight_time,
    "c": reweight_noisy_labels,
    "probe": reweight_probe,
    "d": reweight_table2,
}


def print_markdown(parts: list[str], path: Path = RESULTS_FILE) -> None:
    """The tables of ``docs/benchmarks.md``'s reweighting section, printed from the stored results; each under
    the HTML comment that marks it generated in the doc."""
    stored = json.loads(path.read_text())
    for part in parts:
        for name, body in EXPERIMENTS[part].markdown_tables(stored).items():
            print(generated("python benchmarks/reweight.py --markdown", name, body) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        default=None,
        help=f"comma-separated subset of {list(EXPERIMENTS)} (default a,b,c,d; with --markdown all)",
    )
    add_shared_arguments(parser)
    for experiment in EXPERIMENTS.values():
        experiment.add_arguments(parser)
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="run nothing: print the doc's tables of --parts from the stored --results",
    )
    args = parser.parse_args()
    args.parts = args.parts or (",".join(EXPERIMENTS) if args.markdown else "a,b,c,d")
    unknown = [p for p in args.parts.split(",") if p not in EXPERIMENTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(EXPERIMENTS)}")
    if args.markdown:
        print_markdown(args.parts.split(","), args.results)
        return
    apply_model(args)
    results: dict[str, Any] = {}
    for part in args.parts.split(","):
        results.update(EXPERIMENTS[part].run(args))
    save_results(results, args.results)


if __name__ == "__main__":
    main()
