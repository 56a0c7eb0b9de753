"""Multiple-choice scoring speed: metalora (prefix-cached, and one forward per option) against lm-eval's
``hf`` model on the same prompts, side by side in one process, one thread.

    python benchmarks/eval_speed.py --limit 20

Tasks: 5-shot MMLU (high_school_mathematics: ~85% of every prompt is the shared exemplars) and 0-shot
ARC-Easy, on the embedded SmolLM2-135M. lm-eval scores a local task written by
``metalora.eval.lm_eval_task.write_lm_eval_task`` (the same contexts and continuations) through an
``HFLM`` wrapped around the already loaded model, so no variant pays for loading. Reports items/s of each,
the ratios, and the largest log-likelihood difference between the tools (scores must agree to 1e-5 at
fp32 rounding). Writes ``results/eval_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

from metalora.data import load_task  # noqa: E402
from metalora.eval import evaluate_multiple_choice  # noqa: E402
from metalora.eval.lm_eval_task import write_lm_eval_task  # noqa: E402
from metalora.eval.tasks import mc_view  # noqa: E402
from metalora.models import load_base  # noqa: E402

CASES = [("mmlu:high_school_mathematics", 5), ("arc_easy", 0)]


def ours(model, tok, task, items, shots: int, description: str, cached: bool) -> tuple[float, list]:
    views = [mc_view(e) for e in items]
    pool = {task.name: [mc_view(d) for d in task.dev]}
    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_multiple_choice(
            model, tok, views, fewshot_pool=pool, num_fewshot=shots, description=description,
            progress=False, prefix_cache=cached,
        )  # fmt: skip
    return time.perf_counter() - t0, [np.array(p.loglikelihoods) for p in res.predictions]


def lm_eval_side(model, tok, task, items, shots: int, description: str) -> tuple[float, list]:
    import lm_eval  # the reference (a dev dependency)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = "speed_" + task.name.replace(":", "_")
    with tempfile.TemporaryDirectory() as tmp:
        write_lm_eval_task(items, tmp, name, fewshot=task.dev, num_fewshot=shots, description=description)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=TaskManager(include_path=tmp), log_samples=True,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return seconds, [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]


def measure(limit: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    model, tok = load_base("smollm2-135m")
    rows = []
    for name, shots in CASES:
        task = load_task(name)
        items = task.test[:limit]
        description = task.meta.get("eval", {}).get("description", "")
        t_cached, ll_cached = ours(model, tok, task, items, shots, description, cached=True)
        t_plain, ll_plain = ours(model, tok, task, items, shots, description, cached=False)
        t_lm, ll_lm = lm_eval_side(model, tok, task, items, shots, description)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ll_cached, ll_lm, strict=True))
        rows.append(
            {
                "task": name, "shots": shots, "items": len(items),
                "s_per_item_cached": t_cached / len(items), "s_per_item_plain": t_plain / len(items),
                "s_per_item_lm_eval": t_lm / len(items), "speedup_vs_lm_eval": t_lm / t_cached,
                "speedup_vs_plain": t_plain / t_cached, "max_abs_ll_diff_vs_lm_eval": diff,
                "max_abs_ll": float(max(np.abs(a).max() for a in ll_lm)),
            }
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = [
    "task", "shots", "items", "s_per_item_cached", "s_per_item_plain", "s_per_item_lm_eval",
    "speedup_vs_lm_eval", "speedup_vs_plain", "max_abs_ll_diff_vs_lm_eval",
]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=20, help="items per task")
    p.add_argument("--out", type=Path, default=RESULTS / "eval_speed.json")
    p.add_argument("--markdown", action="store_true", help="print the docs table from the stored JSON")
    args = p.parse_args()
    if not args.markdown:
        rows = measure(args.limit)
        args.out.write_text(json.dumps({"rows": rows, "machine": machine()}, indent=2) + "\n")
    rows = json.loads(args.out.read_text())["rows"]
    shown = [{**r, "max_abs_ll_diff_vs_lm_eval": f"{r['max_abs_ll_diff_vs_lm_eval']:.1e}"} for r in rows]
    print(table(shown, COLUMNS))


if __name__ == "__main__":
    main()
