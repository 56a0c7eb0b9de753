"""The GPU benchmark (issue 17 item 5): random-init LLaMA2-7B-shaped models in bf16, nothing downloaded.

    PYTHONPATH=. python benchmarks/gpu.py                  # one H200: < 8 min, writes results/gpu.json
    PYTHONPATH=. python benchmarks/gpu.py --tiny           # the same code on CPU, tiny shape (CI), temp JSON
    python benchmarks/gpu.py --markdown [--out FILE]       # the tables from the stored JSON, running nothing

Every section is one function (in ``benchmarks/gpubench/``: ``base`` the settings, budget, timing and models;
``training`` (a), (d), (e); ``inference`` (b); ``memory`` (c), (f); ``tables``); one that fails records its
error and the others still run. Ratios are
measured side by side in one process (round-robin repeats, medians, the GPU synchronised around each call).
Train steps run under ``torch.autocast(bf16)`` on a bf16 base with fp32 adapters (the engine's
``precision: bf16``); r = 16 on q,k,v,o, alpha 32, 4 tasks for the task-routed adapters (mixed-task
batches: sample i has task i mod 4); variants share the frozen base tensors (one copy of the 7B weights).

(a) ``a_train_step``: one train step (forward + backward + AdamW) of MTL-LoRA, HydraLoRA, MoELoRA,
    MultiLoRA and DoRA (metalora's ``add_adapter``) over PEFT LoRA's (``peft.get_peft_model``), batch
    8 × 512: time ratio, and peak-memory ratio (see *memory* below).
(b) ``b_inference``: latency against batch size 1–32 of a prefill of 256 tokens then 16 greedy decode
    steps with the KV cache (``logits_to_keep=1``), for merged LoRA (a plain HF model: what a merged LoRA
    serves at), unmerged MTL-LoRA on a mixed-task batch, MoELoRA, HydraLoRA and DoRA (MTL-LoRA's Fig. 4);
    prefill and per-step decode times kept apart; ratios over merged LoRA.
(c) ``c_reweight_memory``: peak memory of one META-LoRA reweighting step (``Reweighting``: validation pass,
    training pass, Eq. 8, the fused update; validation batch = training batch, the published code's) over
    one plain LoRA step (mean of per-sample losses) on the same model and batch; the paper's Table 3 says
    +2–4%. Twice: at the run's batch and r=16 on q,k,v,o, and at the paper's Table 3 setting (batch 4 + 4
    validation, r=32 on attention and MLP; ``paper_setting``).
(d) ``d_meta``: one MeTA-LoRA iteration (``meta_step`` + the engine's outer AdamW step; n=2, k=3,
    |S|=|Q|=8) over the raw forward+backward passes of the same samples (as ``benchmarks/meta.py`` (a)).
(e) ``e_throughput``: tokens/s of a LoRA-MT step on the engine (``multitask_step`` + ``outer_step``)
    against HF ``Trainer`` + PEFT LoRA on the same batch (8 × 512, bf16, grad-norm clip 1.0, AdamW, one
    step = the time between two ``on_step_end`` callbacks, data loading included), and model FLOPs
    utilisation. ``model_flops_per_token`` = 6·N + 12·L·H·d_head·s (PaLM's convention: N the parameters
    that multiply, i.e. every linear weight including the LM head and the adapter, not the embedding
    table; the attention term counts the full s×s score matrix, no causal halving), MFU = tokens/s ·
    that / peak (989 TFLOP/s, the H200's dense bf16; ``--peak-tflops``). ``lora_flops_per_token`` =
    4·N_frozen + 6·N_adapter + attention: what a LoRA step computes (no weight gradient for a frozen
    weight), and ``hfu`` from it. On CPU there is no peak: MFU and HFU are null.
(f) ``f_max_batch``: the largest batch (× 512 tokens) whose LoRA train step fits, plain, with gradient
    checkpointing (HF's ``gradient_checkpointing_enable``, non-reentrant) and on an NF4 base (every
    decoder linear replaced by ``bitsandbytes``' ``Linear4bit``; recorded as an error where bitsandbytes
    cannot be imported). Only that model is on the device. The search (``largest_batch``) starts from a
    linear prediction out of two small probes, doubles until a step fails, then bisects to 3% (CUDA
    out-of-memory caught, the cache emptied), within its time share; a capped search reports its bracket.

*Memory.* Each variant's memory is measured with nothing of the other variants alive (the shared base,
its adapter, its optimizer), after one warm-up step. CUDA: the peak is ``max_memory_allocated`` during
one step (everything allocated on the device, the base included: what the process would peak at), and
the step growth is that minus what was allocated before the step. CPU (``--tiny``): the growth is the
bytes autograd saves for backward during the step (exact, ``SavedTensorBytes``), the peak is resident
(parameters, buffers, optimizer state) plus that; (f) compares that peak with ``--cpu-limit-mib``, a
stand-in for the device's memory, so the search runs in CI.

*Budget.* ``--budget-s`` (450) caps the whole run, imports included: each section gets a share of what is left, repeats stop
at its deadline (at least one), sections with no time left are skipped, and every cut is listed under
``skipped``. The JSON is rewritten after every section, so a killed run keeps what it measured.
``--tiny``: hidden 64, 2 layers, vocab 256, batch 2 × 32, |S|=|Q|=2, fp32, one thread; results go to a temp file
(or ``--out``), never to the committed ``results/gpu.json``. ``--tiny --device cuda`` is a seconds-long
smoke test of the GPU paths.

Needs only torch, transformers, peft and accelerate (and bitsandbytes for (f)'s NF4 row); metalora is
imported from the repository root. A machine without bitsandbytes records that row's import error; to
measure it there, install a ``bitsandbytes`` wheel (``pip download --no-deps --only-binary=:all:``) first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

PROCESS_START = time.monotonic()  # --budget-s counts the imports too
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-init models only: nothing is downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # metalora from the repo root
from common import RESULTS, generated, machine  # noqa: E402
from gpubench.base import (  # noqa: E402
    GOALS,
    NUM_TASKS,
    QKVO,
    SCHEMA,
    SECTION_KEYS,
    SHAPES,
    Bench,
    Budget,
    Setup,
    error_text,
    free_memory,
    make_setup,
)
from gpubench.inference import section_b  # noqa: E402
from gpubench.memory import section_c, section_f  # noqa: E402
from gpubench.tables import markdown, section_markdown  # noqa: E402
from gpubench.training import section_a, section_d, section_e  # noqa: E402

# --- the run -----------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Bench, float], dict[str, Any]]] = {
    "a": section_a,
    "b": section_b,
    "c": section_c,
    "d": section_d,
    "e": section_e,
    "f": section_f,
}


def run_section(bench: Bench, name: str, left: list[str]) -> dict[str, Any]:
    """One guarded section: its result with ``ok``, ``error`` and ``seconds``; never raises."""
    if bench.budget.remaining() < max(bench.setup.min_section_s, 1e-9):
        bench.budget.skip(name, "section", "no time left in --budget-s")
        return {"ok": False, "error": "skipped: no time left in --budget-s", "seconds": 0.0}
    deadline = bench.budget.section_deadline(name, left)
    t0 = time.monotonic()
    try:
        entry = {"ok": True, "error": None, **SECTIONS[name](bench, deadline)}
    except Exception as exc:  # noqa: BLE001 - a failing section is recorded, the next one still runs
        entry = {"ok": False, "error": error_text(exc), "traceback": traceback.format_exc()[-4000:]}
    entry["seconds"] = time.monotonic() - t0
    free_memory(bench.setup)
    return entry


def run(setup: Setup, names: list[str], out: Path) -> dict[str, Any]:
    budget = Budget(setup.budget_s, start=PROCESS_START)
    bench = Bench(setup, budget)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": machine(),
        "setup": {
            **asdict(setup),
            "model_config": SHAPES[setup.shape],
            "targets": QKVO,
            "num_tasks": NUM_TASKS,
        },
        "goals": GOALS,
        "sections": {},
        "skipped": budget.skipped,
    }
    for i, name in enumerate(names):
        key = SECTION_KEYS[name]
        results["sections"][key] = run_section(bench, name, names[i:])
        results["elapsed_s"] = budget.elapsed()
        write_json(out, results)
        print(section_markdown(key, results["sections"][key]) + "\n", flush=True)
    bench.release_base()
    return results


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# --- command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (or --device): CI's check")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/gpu.json; --tiny: a temp file)"
    )
    p.add_argument("--sections", default="a,b,c,d,e,f", help="a comma list of a..f")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time budget in seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (5; tiny 3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (989: H200)")
    p.add_argument("--cpu-limit-mib", type=float, default=4.0, help="(f) on CPU: the memory stand-in")
    p.add_argument("--markdown", action="store_true", help="run nothing: the tables from the stored JSON")
    return p.parse_args(argv)


def default_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.tiny:
        return Path(tempfile.gettempdir()) / "metalora_gpu_tiny.json"
    return RESULTS / "gpu.json"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = default_out(args)
    if args.markdown:
        if not out.is_file():
            raise SystemExit(f"gpu.py: no stored results at {out} (no GPU run has been stored yet)")
        print(generated("python benchmarks/gpu.py --markdown", "gpu", markdown(json.loads(out.read_text()))))
        return
    setup = make_setup(args)
    if args.tiny and not setup.cuda:
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed checkpointing calls
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"gpu.py: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    results = run(setup, names, out)
    failed = [k for k, e in results["sections"].items() if not e["ok"]]
    print(f"wrote {out} in {results['elapsed_s']:.1f} s; sections failed: {failed or 'none'}")


if __name__ == "__main__":
    main()
