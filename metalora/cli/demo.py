"""``metalora demo``: the main job end to end on the embedded default, on a laptop CPU, with no hub.

1. load the embedded SmolLM2-135M-Instruct and four built-in real tasks with short prompts (ARC-Easy,
   CommonsenseQA, Social IQa, SST-2: science QA, commonsense, social reasoning, sentiment);
2. fine-tune one shared LoRA with MeTA-LoRA from 50 examples per task (``configs/demo.yaml``);
3. evaluate the adapted and the base model on each task's held-out test split with the routine of
   ``metalora eval`` (0-shot log-likelihood of the options), written as the run's ``eval.json``;
4. export the adapter as a plain PEFT LoRA and check PEFT reproduces the adapted logits;
5. write ``report.md`` with plots (loss per task, accuracy vs base, efficiency counters).

The MeTA-LoRA rates are the ones the learning check in ``benchmarks/meta_learning.py`` uses and sweeps
(the paper's α=5e-6, β=2e-6 are for 7B models over 1,000 iterations); ``--quick`` keeps every stage but
shrinks the iteration count and the number of test items so that CI can run it as a smoke test in about
2 minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import peft
import torch

from metalora import atomic
from metalora.adapters import export_peft
from metalora.data import load_tasks
from metalora.eval.targets import EvalSettings, evaluate_target
from metalora.models import load_base
from metalora.report import format_table, write_report
from metalora.rundir import RunDir, load_adapted
from metalora.train.config import RunConfig
from metalora.train.runner import run as run_recipe

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
QUICK_OVERRIDES = ["train.max_steps=2", "data.max_length=96"]
EVAL_LIMIT = {"full": 50, "quick": 8}


def demo_config(out_dir: str | Path = "runs/demo", quick: bool = False) -> RunConfig:
    """The recipe the demo trains (``configs/demo.yaml``), into ``out_dir``."""
    if not RECIPE.is_file():
        raise FileNotFoundError(f"the demo recipe {RECIPE} is missing: run the demo from a metalora checkout")
    out_dir = Path(out_dir)
    overrides = [f"name={out_dir.name}", f"output_dir={out_dir.parent}", *(QUICK_OVERRIDES if quick else [])]
    return RunConfig.from_yaml(RECIPE, overrides)


def demo_task_specs() -> list[dict[str, Any]]:
    """The demo's four tasks in cloze form (also the MeTA-LoRA benchmarks' tasks)."""
    return [dict(spec) for spec in demo_config().data.tasks]


def run_demo(quick: bool = False, out_dir: str | Path = "runs/demo") -> Path:
    config = demo_config(out_dir, quick)
    limit = EVAL_LIMIT["quick" if quick else "full"]
    names = ", ".join(spec["name"] for spec in config.data.tasks)
    t0 = time.perf_counter()
    print(f"[1/5] loading the tasks {names}", flush=True)
    tasks = load_tasks(config.data.tasks, seed=config.data.seed)

    print(f"[2/5] MeTA-LoRA: {config.train.max_steps} iterations, 50 examples per task", flush=True)
    run = RunDir(run_recipe(config))

    print(f"[3/5] evaluating the adapted and the base model on {limit} held-out test items per task")
    settings = EvalSettings(split="test", shots=0, limit=limit, batch_size=8, seed=config.data.seed)
    record = evaluate_target(run.root, tasks, settings)
    atomic.write_json(run.eval, record)

    print("[4/5] exporting a PEFT LoRA adapter and checking PEFT reproduces the adapted logits", flush=True)
    model = load_adapted(run.root)
    peft_dir = export_peft(model, run.peft_adapter)
    max_diff = _check_peft_export(model, peft_dir, config.model)

    print("[5/5] writing the report", flush=True)
    notes = (
        f"MeTA-LoRA on SmolLM2-135M-Instruct (embedded, Q4_1 dequantized to fp32), tasks {names}, "
        f"50 training examples per task, {config.train.max_steps} iterations; held-out accuracy on {limit} "
        f"test items per task (0-shot, option log-likelihood). PEFT export max |Δlogit| = {max_diff:.2e}. "
        f"Total time {time.perf_counter() - t0:.0f} s."
        + (" (--quick: a smoke test, too short to learn much)" if quick else "")
    )
    report = write_report(run.root, title="metalora demo: MeTA-LoRA on SmolLM2-135M", notes=notes)
    print("\n" + format_table(record["after"], record["base"]))
    print(f"\nreport: {report}\nPEFT adapter: {peft_dir}\nmetalora adapter: {run.adapter}")
    return run.root


def _check_peft_export(model: torch.nn.Module, peft_dir: Path, base: str) -> float:
    base_model, tokenizer = load_base(base)
    reloaded = peft.PeftModel.from_pretrained(base_model, str(peft_dir)).eval()
    ids = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (reloaded(**ids).logits - model.eval()(**ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"the PEFT export does not reproduce the adapter: max |Δlogit| = {diff:.3e}")
    return diff


def run(args: argparse.Namespace) -> None:
    run_demo(quick=args.quick, out_dir=args.out)
