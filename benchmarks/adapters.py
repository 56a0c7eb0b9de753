"""Adapter speed and memory, measured side by side against PEFT LoRA on the same model and data.

    python benchmarks/adapters.py [--model tiny|smollm2-135m|both] [--batch 8] [--seq 128] [--repeats 10]
    python benchmarks/adapters.py --markdown   # the doc's tables from results/adapters.json, running nothing

(a) training step (forward + backward + AdamW step) time of each adapter over PEFT LoRA's
    (``peft.get_peft_model``), same rank, targets, batch and sequence length; goal MTL-LoRA ≤ 1.10;
(b) inference forward at batch 8: MTL-LoRA unmerged on a mixed-task batch over the merged model (a plain
    HF model, i.e. what merged LoRA serves at); MoELoRA and HydraLoRA reported the same way; goal ≤ 1.15;
(c) memory: activation bytes saved for backward (exact, ``saved_tensors_hooks``) and the peak-RSS growth of
    one training step, each adapter measured in its own fresh subprocess, over PEFT LoRA's.
Prints a table, writes ``benchmarks/results/adapters.json`` and the section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    SavedTensorBytes,
    current_rss_bytes,
    generated,
    interleaved_medians,
    machine,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    run_in_fresh_process,
    save,
    table,
)  # noqa: E402

import metalora as ml  # noqa: E402
from metalora.adapters.targets import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from metalora.models import load_base  # noqa: E402
from metalora.testing import tiny_llama  # noqa: E402

ADAPTERS = ["peft_lora", "lora", "dora", "mtl_lora", "hydra_lora", "multilora", "moelora"]
NUM_TASKS = 4


def build(model_name: str, adapter: str, r: int):
    import peft

    model = load(model_name)
    configs = {
        "lora": ml.LoRAConfig(r=r, alpha=2 * r),
        "dora": ml.LoRAConfig(r=r, alpha=2 * r, use_dora=True),
        "mtl_lora": ml.MTLLoRAConfig(r=r, alpha=2 * r, num_tasks=NUM_TASKS, num_up=3),
        "hydra_lora": ml.HydraLoRAConfig(r=r, alpha=2 * r, num_heads=3),
        "multilora": ml.MultiLoRAConfig(r=r, alpha=2 * r, num_parallel=3),
        "moelora": ml.MoELoRAConfig(r=r, alpha=2 * r, num_tasks=NUM_TASKS, num_experts=4),
    }
    if adapter == "peft_lora":
        targets = list(DEFAULT_ATTENTION_TARGETS)
        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    model = ml.add_adapter(model, configs[adapter])
    with torch.no_grad():  # non-zero B so no branch is skipped or trivially zero
        for p in ml.adapters.adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 1e-3)
    return model


def load(model_name: str):
    if model_name == "tiny":  # the library's tiny builder at a benchmark size (LlamaConfig's 2048 positions)
        return tiny_llama(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ).train()
    return load_base(model_name)[0]


def routing(model, batch: int):
    if not ml.is_task_routed(model):
        return contextlib.nullcontext()
    return ml.task_ids(model, torch.arange(batch) % NUM_TASKS)  # a mixed-task batch


def make_batch(model, batch: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


def train_step_fn(model, x):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()

    def step() -> None:
        with routing(model, x.shape[0]):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_fn(model, x):
    model.eval()

    def fwd() -> None:
        with torch.no_grad(), routing(model, x.shape[0]):
            model(input_ids=x)

    return fwd


def memory_probe(model_name: str, adapter: str, r: int, batch: int, seq: int) -> dict[str, int]:
    """Run in a fresh subprocess: activation bytes and peak-RSS growth of one training step."""
    model = build(model_name, adapter, r)
    x = make_batch(model, batch, seq)
    step = train_step_fn(model, x)
    with torch.no_grad(), routing(model, 1):
        model(input_ids=x[:1, :8])  # touch every code path once, cheaply
    import gc

    gc.collect()
    reset_peak_rss()
    before = current_rss_bytes()
    with SavedTensorBytes() as saved, routing(model, batch):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    del loss
    step()
    return {"saved_activation_bytes": saved.bytes, "peak_rss_growth_bytes": peak_rss_bytes() - before}


def run_model(model_name: str, batch: int, seq: int, r: int, repeats: int) -> dict[str, Any]:
    print(f"\n== {model_name}: batch {batch}, seq {seq}, r {r}, targets q,k,v,o ==", flush=True)
    models = {a: build(model_name, a, r) for a in ADAPTERS}
    x = make_batch(models["lora"], batch, seq)
    train = interleaved_medians({a: train_step_fn(m, x) for a, m in models.items()}, repeats)
    merged_mtl = ml.merge(models["mtl_lora"], task=0)
    fwd_models = {
        "merged": merged_mtl,
        "mtl_lora": models["mtl_lora"],
        "moelora": models["moelora"],
        "hydra_lora": models["hydra_lora"],
        "peft_lora": models["peft_lora"],
    }
    fwd = interleaved_medians({a: forward_fn(m, x) for a, m in fwd_models.items()}, repeats)
    memory = {}
    for a in ADAPTERS:
        memory[a] = run_in_fresh_process("adapters", "memory_probe", model_name, a, r, batch, seq)
    ref_mem = memory["peft_lora"]
    rows = []
    for a in ADAPTERS:
        rows.append(
            {
                "adapter": a,
                "train_step_s": train[a],
                "train_ratio_vs_peft_lora": train[a] / train["peft_lora"],
                "forward_ratio_vs_merged": fwd[a] / fwd["merged"] if a in fwd else None,
                "activation_ratio_vs_peft_lora": memory[a]["saved_activation_bytes"]
                / ref_mem["saved_activation_bytes"],
                "peak_rss_growth_MiB": memory[a]["peak_rss_growth_bytes"] / 2**20,
                "peak_rss_ratio_vs_peft_lora": memory[a]["peak_rss_growth_bytes"]
                / max(ref_mem["peak_rss_growth_bytes"], 1),
            }
        )
    return {
        "model": model_name,
        "batch": batch,
        "seq": seq,
        "r": r,
        "repeats": repeats,
        "train_step_seconds": train,
        "forward_seconds": fwd,
        "memory": memory,
        "rows": rows,
    }


COLUMNS = [
    "adapter",
    "train_step_s",
    "train_ratio_vs_peft_lora",
    "forward_ratio_vs_merged",
    "activation_ratio_vs_peft_lora",
    "peak_rss_growth_MiB",
    "peak_rss_ratio_vs_peft_lora",
]


HEADER = [
    "adapter", "train step (s)", "train vs PEFT LoRA", "forward vs merged (mixed tasks)", "activations vs PEFT LoRA",
    "peak-RSS growth (MiB)", "vs PEFT LoRA",
]  # fmt: skip


def markdown_tables(stored: dict[str, Any]) -> dict[str, str]:
    """The doc's tables, one per stored run, printed from ``results/adapters.json`` (MTL-LoRA's two goal
    ratios in bold)."""
    tables = {}
    for run in stored["runs"]:
        rows = []
        for r in run["rows"]:
            b = "**" if r["adapter"] == "mtl_lora" else ""
            fwd = r["forward_ratio_vs_merged"]
            rows.append(
                [
                    r["adapter"],
                    f"{r['train_step_s']:.3f}",
                    f"{b}{r['train_ratio_vs_peft_lora']:.3f}{b}",
                    f"{b}{fwd:.3f}{b}" if fwd is not None else "—",
                    f"{r['activation_ratio_vs_peft_lora']:.3f}",
                    f"{r['peak_rss_growth_MiB']:.0f}",
                    f"{r['peak_rss_ratio_vs_peft_lora']:.3f}",
                ]
            )
        title = (
            f"**{run['model']}** (batch {run['batch']}, seq {run['seq']}, r {run['r']}, targets q,k,v,o; "
            f"median of {run['repeats']} interleaved repeats):\n\n"
        )
        tables[run["model"]] = title + markdown_table(HEADER, rows)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="both", choices=["tiny", "smollm2-135m", "both"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--markdown", action="store_true", help="run nothing: the doc's tables from the JSON")
    args = parser.parse_args()
    if args.markdown:
        stored = json.loads((RESULTS / "adapters.json").read_text())
        for name, body in markdown_tables(stored).items():
            print(generated("python benchmarks/adapters.py --markdown", name, body) + "\n")
        return
    names = ["tiny", "smollm2-135m"] if args.model == "both" else [args.model]
    results = {
        "machine": machine(),
        "goals": {"mtl_lora_train_ratio": 1.10, "mtl_lora_forward_ratio": 1.15},
        "runs": [run_model(n, args.batch, args.seq, args.r, args.repeats) for n in names],
    }
    for run in results["runs"]:
        print(f"\n{run['model']} (batch {run['batch']}, seq {run['seq']}, r {run['r']})")
        print(table(run["rows"], COLUMNS))
    print("saved", save("adapters", results))


if __name__ == "__main__":
    main()
