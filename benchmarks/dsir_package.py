"""Our DSIR (``metalora/select/dsir.py``) against its authors' ``data-selection`` package on the same data.

    pip download data-selection==1.0.3 --no-deps -d /tmp/dsir && (cd /tmp/dsir && unzip -oq *.whl)
    PYTHONPATH=/tmp/dsir python benchmarks/dsir_package.py      # store results/dsir_package.json
    python benchmarks/dsir_package.py --markdown

Candidates: MedMCQA's training split (``--n`` examples); target: MedQA's dev split; each example's
prompt + response as text. Both compute log w(x) = Σ_b c_b(x)(log p_target(b) − log p_raw(b)) over hashed
unigram+bigram buckets (10,000) of lower-cased word/punctuation tokens. Ours is compared in three settings:
its default (the package's SHA-256 buckets and log(p + 1e-8) estimates), the package's estimates over our
other hash (blake2b), and the earlier default (blake2b buckets, add-1 smoothing). Reported: the Spearman
rank correlation of the log-weights with the package's, and the overlap of the top-k sets (k = N/10,
deterministic top-k, the τ → 0 limit of both samplers). The package runs with one process and
``min_example_length=0``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, measure_or_print  # noqa: E402

from metalora.data import load_task  # noqa: E402
from metalora.select.dsir import dsir_log_importance  # noqa: E402

STORE = RESULTS / "dsir_package.json"
SETTINGS = {
    "default (SHA-256 buckets, log(p + 1e-8))": {},
    "package estimates, blake2b buckets": {"hash_name": "blake2b"},
    "earlier default (blake2b, add-1 smoothing)": {"hash_name": "blake2b", "smoothing": 1.0},
}


def texts(name: str, split: str, n: int | None) -> list[str]:
    examples = load_task(name).split(split)
    return [e.prompt + e.response for e in examples[:n]]


def package_log_weights(candidates: list[str], target: list[str]) -> np.ndarray:
    from data_selection import HashedNgramDSIR  # the authors' package, not a dependency of metalora

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, rows in (("raw", candidates), ("target", target)):
            paths[name] = Path(tmp) / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        dsir = HashedNgramDSIR(
            [str(paths["raw"])],
            [str(paths["target"])],
            cache_dir=f"{tmp}/cache",
            num_proc=1,
            min_example_length=0,
        )
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
        return np.load(Path(tmp) / "cache" / "log_importance_weights" / "0.npy")


def measure(n: int) -> dict[str, Any]:
    candidates, target = texts("medmcqa", "train", n), texts("medqa", "dev", None)
    theirs = package_log_weights(candidates, target)
    k = len(candidates) // 10

    def top(w: np.ndarray) -> set[int]:
        return set(np.argsort(-w, kind="stable")[:k].tolist())

    rows = {}
    for name, options in SETTINGS.items():
        ours = dsir_log_importance(candidates, target, **options)
        rows[name] = {
            "spearman": float(stats.spearmanr(ours, theirs).statistic),
            "top_k_overlap": len(top(ours) & top(theirs)) / k,
            "max_abs_diff": float(np.abs(ours - theirs).max()),
        }
    return {
        "candidates": len(candidates),
        "target": len(target),
        "k": k,
        "settings": rows,
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    rows = [
        [name, f"{v['spearman']:.3f}", f"{v['top_k_overlap']:.2f}", f"{v['max_abs_diff']:.2g}"]
        for name, v in r["settings"].items()
    ]
    head = f"{r['candidates']:,} MedMCQA candidates → {r['target']} MedQA dev targets, k = {r['k']}.\n\n"
    return head + markdown_table(
        ["ours", "Spearman ρ with the package", "top-k overlap", "max |Δ log w|"], rows
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="MedMCQA candidates")
    p.add_argument("--markdown", action="store_true", help="print the docs table from the stored JSON")
    args = p.parse_args()
    measure_or_print(args.markdown, STORE, lambda: measure(args.n), markdown)


if __name__ == "__main__":
    main()
