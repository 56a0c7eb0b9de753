"""Padding with and without length-grouped batching (``multitask.group_by_length``, issue 17 item 6).

    python benchmarks/padding.py             # count (exact) and time (SmolLM2-135M), store results/padding.json
    python benchmarks/padding.py --markdown  # the docs table from the stored JSON

For each setting the LoRA-MT batches of one seed are drawn twice from the same tokenized pools, with the
plain shuffle and grouped by length, and the input tokens are counted with and without right-padding
(exact counts, real SmolLM2 tokenizer). The time column runs forward+backward of the first ``--time-steps``
batches of each order on SmolLM2-135M with a LoRA (r=16, q,k,v,o), round-robin, on this process's CPU
clock (the machine may be shared), and reports the summed times of sorted micro-batches of 2 and of
length-grouped batches against one batch of 8 (the same samples for the first two, other batches for the third).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, measure_or_print  # noqa: E402

from metalora.adapters.api import add_adapter, config_from_dict  # noqa: E402
from metalora.data import build_pools, collate, load_tasks, task_id_map, tokenize_examples  # noqa: E402
from metalora.models import load_base  # noqa: E402
from metalora.train.batching import count_tokens, longest_first, padded_tokens  # noqa: E402
from metalora.train.multitask import EpochBatches  # noqa: E402

STORE = RESULTS / "padding.json"
COMMONSENSE = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa"]
SETTINGS = {  # name: (tasks, examples per task, batch size, steps)
    "arc_easy, 50 examples, batch 8, 6 steps (the issue's case)": (["arc_easy"], 50, 8, 6),
    "8 commonsense tasks, 100 each, batch 8, 80 steps (the Table 2 study)": (COMMONSENSE, 100, 8, 80),
}


def draw(features: list[dict[str, Any]], batch: int, steps: int, grouped: bool) -> list[list[dict]]:
    batches = EpochBatches(features, batch, seed=0, group_by_length=grouped)
    return [batches.sample() for _ in range(steps)]


def sorted_micro_batches(batch: list[dict], size: int) -> list[list[dict]]:
    """What ``multitask_step`` feeds the model with ``micro_batch_size``: the batch sorted by length, cut."""
    ordered = longest_first(batch)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def fwd_bwd_seconds(model: Any, batches: list[list[dict]], pad: int) -> float:
    t0 = time.process_time()
    for b in batches:
        x = collate(b, pad)
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["labels"])
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - t0


def measure_setting(tokenizer: Any, model: Any, spec: tuple, time_steps: int, repeats: int) -> dict:
    names, k, batch, steps = spec
    tasks = load_tasks(names, seed=0)
    pools = build_pools(tasks, k, seed=0)
    ids = task_id_map(tasks)
    features = [
        f for exs in pools.values() for f in tokenize_examples(exs, tokenizer, ids, max_length=256)[0]
    ]
    row: dict[str, Any] = {"batch": batch, "steps": steps}
    orders = {g: draw(features, batch, steps, g) for g in (False, True)}
    for grouped, batches in orders.items():
        key = "grouped" if grouped else "plain"
        row[f"{key}_tokens"] = sum(count_tokens(b) for b in batches)
        row[f"{key}_padded_tokens"] = padded_tokens(batches)
    row["micro2_padded_tokens"] = padded_tokens(
        [m for b in orders[False] for m in sorted_micro_batches(b, 2)]
    )
    row["time_steps"] = time_steps
    if not time_steps:
        return row
    fed = {  # what the model runs for the first time_steps optimizer steps of each way
        "plain": orders[False][:time_steps],
        "micro2": [m for b in orders[False][:time_steps] for m in sorted_micro_batches(b, 2)],
        "grouped": orders[True][:time_steps],
    }
    times: dict[str, list[float]] = {k: [] for k in fed}
    for _ in range(repeats):  # round-robin, so drift on a shared machine hits all alike
        for key, batches in fed.items():
            times[key].append(fwd_bwd_seconds(model, batches, tokenizer.pad_token_id))
    row |= {f"{key}_s": min(t) for key, t in times.items()}
    return row


def measure(time_steps: int, repeats: int) -> dict[str, Any]:
    model, tokenizer = load_base("smollm2-135m")
    model = add_adapter(model, config_from_dict("lora", {"r": 16, "alpha": 32}), seed=0)
    rows = {
        name: measure_setting(tokenizer, model, spec, time_steps, repeats) for name, spec in SETTINGS.items()
    }
    return {"settings": rows, "machine": machine(), "repeats": repeats, "clock": "process_time (min)"}


def _time_ratios(r: dict[str, Any]) -> str:
    if not r["time_steps"]:
        return "not run"
    micro = f"{r['micro2_s'] / r['plain_s']:.3f} / " if "micro2_s" in r else ""
    return f"{micro}{r['grouped_s'] / r['plain_s']:.3f} (first {r['time_steps']} steps)"


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, r in result["settings"].items():
        pad = [1 - r["plain_tokens"] / r[f"{k}_padded_tokens"] for k in ("plain", "micro2", "grouped")]
        rows.append(
            [
                name,
                f"{r['plain_tokens']:,}",
                f"{r['plain_padded_tokens']:,} ({pad[0]:.0%} padding)",
                f"{r['micro2_padded_tokens']:,} ({pad[1]:.0%} padding)",
                f"{r['grouped_padded_tokens']:,} ({pad[2]:.0%} padding)",
                f"{r['grouped_padded_tokens'] / r['plain_padded_tokens']:.3f}",
                _time_ratios(r),
            ]
        )
    header = [
        "setting",
        "tokens",
        "one batch, padded",
        "sorted micro-batches of 2",
        "group_by_length",
        "grouped / one batch",
        "time vs one batch: micro-batches / grouped",
    ]
    return markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="print the docs table from the stored JSON")
    p.add_argument("--time-steps", type=int, default=6, help="0: count tokens only (no model)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    measure_or_print(args.markdown, STORE, lambda: measure(args.time_steps, args.repeats), markdown)


if __name__ == "__main__":
    main()
