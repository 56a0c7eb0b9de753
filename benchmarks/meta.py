"""MeTA-LoRA efficiency and learning benchmark (issue 4): prints a table, writes ``results/meta.json``.

    python benchmarks/meta.py                          # parts a, b, c at the default (CPU) scale
    python benchmarks/meta_learning.py ...             # (d) the learning check and LR sweep: see that file

(a) **Overhead.** Wall time of one MeTA-LoRA iteration (``meta_step`` + the engine's outer AdamW step:
    snapshot, k inner SGD steps per task, query gradients, restore, all-reduce, guard) over the time of
    the raw forward+backward passes of the same samples (plain HF ``model(..., labels).loss.backward()``
    on the same batches, nothing else). Measured interleaved (round-robin, median). Goal ≤ 1.05.
(b) **Peak memory.** Peak of one MeTA-LoRA iteration over one LoRA-MT step at the same batch size
    (|S| = |Q| = LoRA-MT batch), each measured in its own subprocess (CPU: the resettable VmHWM peak RSS,
    under glibc's default malloc and with its mmap threshold pinned so RSS tracks live memory;
    CUDA: ``max_memory_allocated``). Also the exact extra state MeTA-LoRA keeps (θ snapshot + summed
    query gradients = 2 × adapter bytes) and the activation bytes autograd saves per forward. Goal ≤ 1.05.
(c) **Table 7 at our scale.** Optimizer steps and samples processed of MeTA-LoRA (50 examples per task,
    the paper's n, k, |S|, |Q|) against LoRA-MT on the full training splits of the built-in tasks, with
    token counts from the real SmolLM2 tokenization (the demo's 4 tasks, cloze, ≤128 tokens); a wall time
    projected from (a)'s per-sample times here, and from SmolLM2's measured per-token training times by
    ``benchmarks/meta_learning.py summary``.
(d) **Learning check** and the LR sweep: ``benchmarks/meta_learning.py`` (it trains whole runs).

Scale: this machine has 2 shared CPU cores, on which one SmolLM2-135M forward+backward of 8×64 tokens
takes ~45 s; (a)/(b) therefore run by default on a small random-init Llama ("mini": hidden 128, 2 layers,
vocab 4096, seq 64). A smaller model makes the fixed per-iteration costs (Python, snapshot/restore,
collation) a *larger* share, so the overhead ratio there is an upper bound for SmolLM2. ``--model
smollm2-135m`` runs them on the real model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SavedTensorBytes,
    generated,
    interleaved_medians,
    machine,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    save,
    table,
)

import metalora as ml  # noqa: E402
from metalora.adapters.targets import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from metalora.cli.demo import demo_task_specs  # noqa: E402
from metalora.testing import tiny_llama  # noqa: E402
from metalora.train import Engine, EngineConfig, MetaConfig, MultitaskConfig  # noqa: E402
from metalora.train.batching import count_tokens, micro_batches  # noqa: E402
from metalora.train.meta import build_sampler, meta_step  # noqa: E402
from metalora.train.multitask import EpochBatches, multitask_step, steps_for_epochs  # noqa: E402

DEMO_TASK_SPECS = demo_task_specs()

TASKS = DEMO_TASK_SPECS  # (c) and (d) use the demo's tasks, cloze style (the response is the answer's text)
QKVO = list(DEFAULT_ATTENTION_TARGETS)
PAPER = {"n_tasks": 2, "inner_steps": 3, "support_size": 8, "query_size": 8}


# --- models and data -------------------------------------------------------------------------------


def load_model(name: str, r: int):
    """(adapted model, pad id, vocab) for ``mini`` (random-init Llama) or a ``load_base`` name."""
    if name == "mini":  # the library's tiny builder at a benchmark size
        model = tiny_llama(
            vocab_size=4096, hidden_size=128, intermediate_size=512, max_position_embeddings=512
        )
        model, pad, vocab = model.train(), 0, 4096
    else:
        model, tok = ml.load_base(name)
        pad, vocab = tok.pad_token_id, len(tok)
    ml.add_adapter(model, ml.LoRAConfig(r=r, alpha=2 * r, target_modules=QKVO))
    return model, pad, vocab


def random_pools(vocab: int, seq: int, per_task: int = 50, n_tasks: int = 4) -> dict[str, list[dict]]:
    """Fixed-length random features (half prompt, half response), like the real pools in shape."""
    gen = torch.Generator().manual_seed(0)
    pools = {}
    for t in range(n_tasks):
        feats = []
        for i in range(per_task):
            ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
            feats.append(
                {
                    "input_ids": ids,
                    "labels": [-100] * (seq // 2) + ids[seq // 2 :],
                    "task_id": t,
                    "sample_id": f"t{t}/{i}",
                }
            )
        pools[f"t{t}"] = feats
    return pools


def real_features(
    tokenizer_name: str, seq: int, per_task: int | None, seed: int = 0
) -> dict[str, list[dict]]:
    from metalora.data import build_pools, load_tasks, task_id_map, tokenize_examples

    tasks = load_tasks(TASKS, seed=seed)
    ids = task_id_map(tasks)
    examples = build_pools(tasks, per_task, seed=seed) if per_task else {t.name: t.train for t in tasks}
    _, tok = ml.load_base(tokenizer_name) if tokenizer_name else (None, None)
    return {n: tokenize_examples(e, tok, ids, max_length=seq)[0] for n, e in examples.items()}


# --- (a) overhead ---------------------------------------------------------------------------------------


def part_a(model_name: str, seq: int, r: int, repeats: int) -> dict[str, Any]:
    model, pad, vocab = load_model(model_name, r)
    pools = random_pools(vocab, seq)
    cfg = MetaConfig(**PAPER, inner_lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(model, EngineConfig(max_steps=10**6, lr=1e-4, progress=False, device="cpu"), tmp)
        model.train()
        sampler = build_sampler(pools, cfg)
        episodes = [sampler.sample() for _ in range(4)]
        mt_batches = EpochBatches([f for fs in pools.values() for f in fs], 8, seed=0)
        state = {"i": 0}

        def current():
            return episodes[state["i"] % len(episodes)]

        def meta_iteration() -> None:
            engine.outer_step(meta_step(engine, current(), cfg, pad), 0)

        # the raw passes of exactly the same samples: k × support + query per task, nothing else
        raw_batches = {
            id(eps): [
                b
                for ep in eps
                for b in [micro_batches(ep.support, pad, None)[0]] * cfg.inner_steps
                + micro_batches(ep.query, pad, None)
            ]
            for eps in episodes
        }

        def raw_passes() -> None:
            for b in raw_batches[id(current())]:
                model(
                    input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
                ).loss.backward()
            model.zero_grad(set_to_none=True)
            state["i"] += 1

        def mt_step() -> None:
            engine.outer_step(
                multitask_step(engine, mt_batches.sample(), MultitaskConfig(batch_size=8), pad), 0
            )

        times = interleaved_medians(
            {"meta": meta_iteration, "raw": raw_passes, "mt": mt_step}, repeats=repeats
        )
    samples = cfg.samples_per_iteration()
    return {
        "model": model_name,
        "seq": seq,
        "r": r,
        "repeats": repeats,
        **PAPER,
        "meta_iteration_s": times["meta"],
        "raw_fwd_bwd_s": times["raw"],
        "lora_mt_step_s": times["mt"],
        "overhead_ratio": times["meta"] / times["raw"],
        "goal": 1.05,
        "meta_s_per_sample": times["meta"] / samples,
        "lora_mt_s_per_sample": times["mt"] / 8,
    }


# --- (b) memory -----------------------------------------------------------------------------------------


def memory_probe(kind: str, model_name: str, seq: int, r: int) -> dict[str, Any]:
    """One process, one kind of step: the peak over three steps after two warm-up steps."""
    torch.set_num_threads(1)
    model, pad, vocab = load_model(model_name, r)
    pools = random_pools(vocab, seq)
    cfg = MetaConfig(**PAPER, inner_lr=1e-4)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(model, EngineConfig(max_steps=10**6, lr=1e-4, progress=False), tmp)
        model.train()
        sampler, batches = (
            build_sampler(pools, cfg),
            EpochBatches([f for fs in pools.values() for f in fs], 8, 0),
        )

        def step() -> None:
            if kind == "meta":
                engine.outer_step(meta_step(engine, sampler.sample(), cfg, pad), 0)
            else:
                engine.outer_step(
                    multitask_step(engine, batches.sample(), MultitaskConfig(batch_size=8), pad), 0
                )

        for _ in range(2):  # warm up the allocator, then measure the steady state
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
        with SavedTensorBytes() as saved:
            batch = micro_batches(pools["t0"][:8], pad, None)[0]
            _ = model(
                input_ids=batch["input_ids"].to(engine.device), labels=batch["labels"].to(engine.device)
            )
    adapter_bytes = sum(p.numel() * p.element_size() for p in engine.params.values())
    return {
        "kind": kind,
        "peak_bytes": int(peak),
        "peak_kind": "cuda_max_allocated" if cuda else "cpu_vmhwm",
        "activation_bytes_per_forward": saved.bytes,
        "adapter_bytes": adapter_bytes,
    }


def part_b(model_name: str, seq: int, r: int) -> dict[str, Any]:
    """Peaks under glibc's default malloc and with its dynamic mmap threshold pinned (64 KiB), where
    freed activation buffers go back to the OS, so the CPU peak RSS tracks live memory (on CUDA the
    caching allocator's ``max_memory_allocated`` needs neither)."""
    import os

    out: dict[str, Any] = {"model": model_name, "seq": seq, "batch": 8, "goal": 1.05}
    for label, extra_env in (
        ("default_malloc", {}),
        ("pinned_mmap_threshold", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    ):
        probes = {}
        for kind in ("meta", "mt"):
            cmd = [
                sys.executable,
                __file__,
                "--probe",
                kind,
                "--model",
                model_name,
                "--seq",
                str(seq),
                "--r",
                str(r),
            ]
            res = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={**os.environ, **extra_env}
            )
            probes[kind] = json.loads(res.stdout.strip().splitlines()[-1])
        out[label] = {
            "meta_peak_bytes": probes["meta"]["peak_bytes"],
            "lora_mt_peak_bytes": probes["mt"]["peak_bytes"],
            "peak_ratio": probes["meta"]["peak_bytes"] / probes["mt"]["peak_bytes"],
        }
        out["peak_kind"] = probes["meta"]["peak_kind"]
        out["meta_extra_state_bytes"] = 2 * probes["meta"]["adapter_bytes"]
        out["activation_bytes_per_forward"] = probes["meta"]["activation_bytes_per_forward"]
    return out


# --- (c) Table 7 at our scale ---------------------------------------------------------------------------


def part_c(
    tokenizer_name: str, seq: int, iterations: int, mt_epochs: float, a: dict[str, Any] | None
) -> dict[str, Any]:
    few = real_features(tokenizer_name, seq, per_task=50)
    full = real_features(tokenizer_name, seq, per_task=None)
    cfg = MetaConfig(**PAPER)
    sampler = build_sampler(few, cfg)
    meta_tokens = 0
    for _ in range(iterations):
        meta_tokens += sum(
            cfg.inner_steps * count_tokens(e.support) + count_tokens(e.query) for e in sampler.sample()
        )
    n_full = sum(len(f) for f in full.values())
    mt_steps = steps_for_epochs(n_full, 8, mt_epochs)
    mean_len = sum(count_tokens(f) for f in full.values()) / n_full
    rows = {
        "meta_lora": {
            "examples": sum(len(f) for f in few.values()),
            "optimizer_steps": iterations,
            "samples": iterations * cfg.samples_per_iteration(),
            "tokens": meta_tokens,
        },
        "lora_mt_full": {
            "examples": n_full,
            "optimizer_steps": mt_steps,
            "samples": mt_steps * 8,
            "tokens": round(mt_steps * 8 * mean_len),
        },
    }
    if a is not None:  # projected wall time from (a)'s measured per-sample times (same model scale as (a))
        rows["meta_lora"]["projected_wall_s"] = rows["meta_lora"]["samples"] * a["meta_s_per_sample"]
        rows["lora_mt_full"]["projected_wall_s"] = rows["lora_mt_full"]["samples"] * a["lora_mt_s_per_sample"]
    return {
        "tasks": [t["name"] for t in TASKS],
        "seq": seq,
        "iterations": iterations,
        "lora_mt_epochs": mt_epochs,
        "lora_mt_batch": 8,
        "paper_table7": {
            "meta_lora": {"optimizer_steps": 1000, "samples": 64000},
            "lora": {"optimizer_steps": 60885, "samples": 487075},
        },
        "rows": rows,
        "wall_time_basis": f"(a) per-sample times on model {a['model'] if a else 'n/a'}",
    }


# --- main -------------------------------------------------------------------------------------------------


def markdown_ab(stored: dict[str, Any]) -> str:
    """The doc's table of (a) and (b), printed from ``results/meta.json``."""
    a, b = stored["a_overhead"], stored["b_memory"]
    tasks, k, support, query = a["n_tasks"], a["inner_steps"], a["support_size"], a["query_size"]
    rows = [
        [
            f"(a) MeTA-LoRA iteration time / raw forward+backward of the same samples (n={tasks}, k={k}, "
            f"\\|S\\|={support}, \\|Q\\|={query})",
            f"**{a['overhead_ratio']:.3f}**",
            f"≤ {a['goal']:.2f}",
        ],
        [
            "(b) peak memory / a LoRA-MT step at the same batch (default malloc; with the mmap threshold pinned)",
            f"**{b['default_malloc']['peak_ratio']:.3f}** ({b['pinned_mmap_threshold']['peak_ratio']:.3f})",
            f"≤ {b['goal']:.2f}",
        ],
    ]
    return markdown_table(["check", "measured", "goal"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b,c")
    p.add_argument(
        "--model", default="mini", help="'mini' (random-init small Llama) or a load_base name, for (a)/(b)"
    )
    p.add_argument("--real-model", default="smollm2-135m", help="model/tokenizer for (c)/(d)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, default=1000, help="MeTA-LoRA iterations for (c) and (d)")
    p.add_argument("--mt-epochs", type=float, default=3.0, help="full-data LoRA-MT epochs for (c)")
    p.add_argument("--probe", choices=["meta", "mt"], help=argparse.SUPPRESS)
    p.add_argument(
        "--markdown", action="store_true", help="run nothing: the doc's (a)/(b) table from the JSON"
    )
    args = p.parse_args()
    if args.markdown:
        stored = json.loads((Path(__file__).resolve().parent / "results" / "meta.json").read_text())
        print(generated("python benchmarks/meta.py --markdown", "ab", markdown_ab(stored)))
        return
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.model, args.seq, args.r)))
        return
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {"machine": machine(), "parts": sorted(parts)}
    if "a" in parts:
        out["a_overhead"] = a = part_a(args.model, args.seq, args.r, args.repeats)
        print(table([a], ["model", "seq", "meta_iteration_s", "raw_fwd_bwd_s", "overhead_ratio", "goal"]))
    if "b" in parts:
        out["b_memory"] = b = part_b(args.model, args.seq, args.r)
        rows = [
            {
                "allocator": k,
                "meta_peak_MiB": b[k]["meta_peak_bytes"] / 2**20,
                "lora_mt_peak_MiB": b[k]["lora_mt_peak_bytes"] / 2**20,
                "peak_ratio": b[k]["peak_ratio"],
                "extra_state_KiB": b["meta_extra_state_bytes"] / 2**10,
                "goal": 1.05,
            }
            for k in ("default_malloc", "pinned_mmap_threshold")
        ]
        print(
            table(
                rows,
                ["allocator", "meta_peak_MiB", "lora_mt_peak_MiB", "peak_ratio", "extra_state_KiB", "goal"],
            )
        )
    if "c" in parts:
        out["c_table7"] = c = part_c(
            args.real_model, 128, args.iterations, args.mt_epochs, out.get("a_overhead")
        )
        rows = [{"method": k, **v} for k, v in c["rows"].items()]
        print(table(rows, ["method", "examples", "optimizer_steps", "samples", "tokens", "projected_wall_s"]))
    previous = {}
    path = Path(__file__).resolve().parent / "results" / "meta.json"
    if path.is_file():
        previous = json.loads(path.read_text())
    print(f"wrote {save('meta', {**previous, **out})}")


if __name__ == "__main__":
    main()
