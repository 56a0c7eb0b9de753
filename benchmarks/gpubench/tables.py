"""``benchmarks/gpu.py``'s tables: one per section, printed from the stored JSON."""

from __future__ import annotations

from typing import Any

from common import markdown_table

# --- tables --------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def ms(s: float | None) -> str:
    return "—" if s is None else f"{1e3 * s:.3g} ms"


def ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def ratio_table(e: dict[str, Any], key: str, ref: str) -> str:
    """The rows of ``ratio_rows``: time and memory against the reference ``ref``."""
    rows = [
        [r[key], ms(r["step_s"]), ratio(r["time_ratio"]), mib(r["peak_bytes"]), ratio(r["peak_ratio"]),
         mib(r["step_growth_bytes"]), ratio(r["growth_ratio"])]
        for r in e["rows"]
    ]  # fmt: skip
    header = [key, "time", f"time / {ref}", "peak", f"peak / {ref}", "step growth", f"growth / {ref}"]
    return markdown_table(header, rows)


def table_a(e: dict[str, Any]) -> str:
    title = (
        f"(a) train step, batch {e['batch']} × {e['seq']}, r {e['r']} on q,k,v,o; median of {e['repeats']}; "
        f"memory: {e['memory_kind']}"
    )
    return title + "\n\n" + ratio_table(e, "adapter", "PEFT LoRA")


def table_b(e: dict[str, Any]) -> str:
    sizes = e["batch_sizes"]
    cells = {(r["model"], r["batch"]): r for r in e["rows"]}
    models = list(dict.fromkeys(r["model"] for r in e["rows"]))
    rows = [
        [m]
        + [
            f"{ms(cells[m, b]['latency_s'])} ({ratio(cells[m, b]['latency_ratio'])})"
            if (m, b) in cells
            else "—"
            for b in sizes
        ]
        for m in models
    ]
    title = (
        f"(b) latency of prefill {e['prefill_tokens']} + {e['decode_steps']} decode steps (ratio to merged "
        "LoRA), by batch size"
    )
    return title + "\n\n" + markdown_table(["model"] + [f"batch {b}" for b in sizes], rows)


def table_c(e: dict[str, Any]) -> str:
    title = (
        f"(c) reweighting ({e['scheme']}, batch {e['batch']} + {e['val_batch']} validation, {e['seq']} tokens, "
        f"r {e.get('r', 16)} on q,k,v,o); paper {e['paper_table3']}, goal ≤ {e['goal']}; memory: {e['memory_kind']}"
    )
    text = title + "\n\n" + ratio_table(e, "step", "LoRA")
    paper = e.get("paper_setting")
    if paper:
        text += (
            f"\n\nthe paper's Table 3 setting: batch {paper['batch']} + {paper['val_batch']} validation, r "
            f"{paper['r']} on attention and MLP ({paper['scheme']})\n\n" + ratio_table(paper, "step", "LoRA")
        )
    return text


def table_d(e: dict[str, Any]) -> str:
    episode = (
        f"n={e['n_tasks']}, k={e['inner_steps']}, \\|S\\|={e['support_size']}, \\|Q\\|={e['query_size']}"
    )
    row = [f"{episode}, {e['seq']} tokens", ms(e["meta_iteration_s"]), ms(e["raw_fwd_bwd_s"]),
           f"**{ratio(e['overhead_ratio'])}**", f"≤ {e['goal']}"]  # fmt: skip
    header = ["episode", "MeTA-LoRA iteration", "raw fwd+bwd", "ratio", "goal"]
    return "(d) MeTA-LoRA iteration against the raw passes of the same samples\n\n" + markdown_table(
        header, [row]
    )


def table_e(e: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f}%"

    rows = [
        [r["method"], ms(r["step_s"]), f"{r['tokens_per_s']:,.0f}", pct(r["mfu"]), pct(r["hfu"])]
        for r in e["rows"]
    ]
    peak = f"{e['peak_tflops']} TFLOP/s" if e["peak_tflops"] else "no peak on a CPU"
    title = (
        f"(e) LoRA-MT step against HF Trainer + PEFT, batch {e['batch']} × {e['seq']}: tokens/s ratio "
        f"**{ratio(e['tokens_per_s_ratio'])}** (goal ≥ {e['goal']}); MFU = tokens/s · "
        f"{e['model_flops_per_token']:.4g} FLOP/token / {peak}"
    )
    return (
        title + "\n\n" + markdown_table(["method", "step", "tokens/s", "MFU (6N)", "HFU (LoRA FLOPs)"], rows)
    )


def table_f(e: dict[str, Any]) -> str:
    def cells(r: dict[str, Any]) -> list[str]:
        if r.get("error"):
            return [r["variant"], "error", r["error"][:120], "", ""]
        failing = r.get("first_failing_batch")
        return [
            r["variant"],
            str(r["largest_batch"]),
            "—" if failing is None else str(failing),
            str(len(r.get("trials", []))),
            "yes" if r.get("capped") else "no",
        ]

    header = ["base", "largest batch that fits", "smallest that failed", "trials", "time-capped"]
    title = f"(f) largest batch × {e['seq']} tokens, LoRA train step; memory: {e['memory_kind']}"
    return title + "\n\n" + markdown_table(header, [cells(r) for r in e["rows"]])


TABLES = {
    "a_train_step": table_a,
    "b_inference": table_b,
    "c_reweight_memory": table_c,
    "d_meta": table_d,
    "e_throughput": table_e,
    "f_max_batch": table_f,
}


def section_markdown(key: str, entry: dict[str, Any]) -> str:
    if not entry.get("ok"):
        return f"{key}: not measured ({entry.get('error')})"
    return TABLES[key](entry)


def markdown(results: dict[str, Any]) -> str:
    """Every section's table from stored results, then what the budget cut."""
    device = results["machine"]["device"]
    parts = [
        f"{key} — {device}, {results['setup']['shape']}:\n\n{section_markdown(key, e)}"
        for key, e in results["sections"].items()
    ]
    if results["skipped"]:
        cut = [[s["section"], s["what"], s["reason"]] for s in results["skipped"]]
        parts.append("cut by the time budget\n\n" + markdown_table(["section", "what", "reason"], cut))
    return "\n\n".join(parts)
