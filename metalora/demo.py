"""``metalora demo``: the main job end to end on the embedded default, on a laptop CPU, with no hub.

1. load the embedded SmolLM2-135M-Instruct and four built-in real tasks with short prompts (ARC-Easy,
   CommonsenseQA, Social IQa, SST-2: science QA, commonsense, social reasoning, sentiment);
2. evaluate the base model on each task's held-out test split (0-shot log-likelihood of the options);
3. fine-tune one shared LoRA with MeTA-LoRA from 50 examples per task;
4. evaluate the adapted model on the same prompts;
5. export the adapter as a plain PEFT LoRA and check PEFT reproduces the adapted logits;
6. write ``report.md`` with plots (loss per task, accuracy vs base, efficiency counters).

The MeTA-LoRA rates are the ones the learning check in ``benchmarks/meta_learning.py`` uses and sweeps
(the paper's α=5e-6, β=2e-6 are for 7B models over 1,000 iterations); ``--quick`` keeps every stage but
shrinks the iteration count and the number of test items so that CI can run it as a smoke test in about
2 minutes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from metalora import atomic

DEMO_TASKS = ["arc_easy", "csqa", "siqa", "sst2"]
MC_STYLE = "text"
DEMO_TASK_SPECS = [{"name": name, "mc_response": MC_STYLE} for name in DEMO_TASKS]  # cloze: answer text

FULL = {"iterations": 50, "eval_limit": 50, "max_length": 128}
QUICK = {"iterations": 2, "eval_limit": 8, "max_length": 96}


def demo_recipe(out_dir: Path, quick: bool) -> dict[str, Any]:
    """The MeTA-LoRA recipe the demo trains (also a template for users' own runs)."""
    scale = QUICK if quick else FULL
    return {
        "name": out_dir.name,
        "output_dir": str(out_dir.parent),
        "algorithm": "meta",
        "model": "smollm2-135m",
        "adapter": {
            "type": "lora",
            "r": 16,
            "alpha": 32,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        # cloze style: the response is the answer's text (scored with acc_norm, as lm-eval does); a 135M
        # model does not learn to bind option letters to contents in tens of steps
        "data": {
            "tasks": [dict(spec) for spec in DEMO_TASK_SPECS],
            "examples_per_task": 50,
            "max_length": scale["max_length"],
            "seed": 0,
        },
        # CPU-sized episodes: all 4 tasks per iteration, k=1 inner SGD step on |S|=|Q|=4, i.e.
        # n·(k·|S| + |Q|) = 32 samples per iteration (the paper's n=2, k=3, |S|=|Q|=8 are in
        # configs/meta_lora.yaml); rates sized for a 135M model and tens of iterations, not 7B and 1,000.
        "meta": {
            "n_tasks": 4,
            "inner_steps": 1,
            "support_size": 4,
            "query_size": 4,
            "inner_lr": 1e-2,
            "seed": 0,
        },
        "train": {
            "max_steps": scale["iterations"],
            "lr": 2e-3,
            "schedule": "constant",
            "checkpoint_every": 10,
            "seed": 0,
        },
    }


def run_demo(quick: bool = False, out_dir: str | Path = "runs/demo") -> Path:
    from metalora.adapters import export_peft, load_adapter
    from metalora.data import load_tasks
    from metalora.evaluate import evaluate_tasks, format_table
    from metalora.models import load_base
    from metalora.report import write_report
    from metalora.train import run

    out_dir = Path(out_dir)
    scale = QUICK if quick else FULL
    t0 = time.perf_counter()
    print(f"[1/6] loading SmolLM2-135M and the tasks {', '.join(DEMO_TASKS)}", flush=True)
    tasks = load_tasks(DEMO_TASK_SPECS, seed=0)
    base, tokenizer = load_base("smollm2-135m")
    eval_kwargs = dict(split="test", shots=0, limit=scale["eval_limit"], batch_size=8, progress=True)

    print(
        f"[2/6] evaluating the base model on {scale['eval_limit']} held-out test items per task", flush=True
    )
    with torch.no_grad():
        before = evaluate_tasks(base, tokenizer, tasks, **eval_kwargs)
    del base

    print(f"[3/6] MeTA-LoRA: {scale['iterations']} iterations, 50 examples per task", flush=True)
    run_dir = run(demo_recipe(out_dir, quick))

    print("[4/6] evaluating the adapted model on the same prompts", flush=True)
    model = load_adapter(load_base("smollm2-135m")[0], run_dir / "adapter")
    with torch.no_grad():
        after = evaluate_tasks(model, tokenizer, tasks, **eval_kwargs)
    atomic.write_json(
        run_dir / "eval.json",
        {"split": "test", "limit": scale["eval_limit"], "shots": 0, "after": after, "base": before},
    )

    print("[5/6] exporting a PEFT LoRA adapter and checking PEFT reproduces the adapted logits", flush=True)
    peft_dir = export_peft(model, run_dir / "peft_adapter")
    max_diff = _check_peft_export(model, peft_dir, tokenizer)

    print("[6/6] writing the report", flush=True)
    notes = (
        f"MeTA-LoRA on SmolLM2-135M-Instruct (embedded, Q4_1 dequantized to fp32), tasks "
        f"{', '.join(DEMO_TASKS)}, 50 training examples per task, {scale['iterations']} iterations; "
        f"held-out accuracy on {scale['eval_limit']} test items per task (0-shot, option log-likelihood). "
        f"PEFT export max |Δlogit| = {max_diff:.2e}. Total time {time.perf_counter() - t0:.0f} s."
        + (" (--quick: a smoke test, too short to learn much)" if quick else "")
    )
    report = write_report(run_dir, title="metalora demo: MeTA-LoRA on SmolLM2-135M", notes=notes)
    print("\n" + format_table(after, before))
    print(f"\nreport: {report}\nPEFT adapter: {peft_dir}\nmetalora adapter: {run_dir / 'adapter'}")
    return run_dir


def _check_peft_export(model: torch.nn.Module, peft_dir: Path, tokenizer: Any) -> float:
    import peft

    from metalora.models import load_base

    reloaded = peft.PeftModel.from_pretrained(load_base("smollm2-135m")[0], str(peft_dir)).eval()
    ids = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (reloaded(**ids).logits - model.eval()(**ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"the PEFT export does not reproduce the adapter: max |Δlogit| = {diff:.3e}")
    return diff
