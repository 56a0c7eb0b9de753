"""``benchmarks/gpu.py`` sections (a) train steps against PEFT LoRA, (d) the MeTA-LoRA iteration and (e) LoRA-MT
throughput and MFU against HF ``Trainer``."""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import metalora as ml
from gpubench.base import (
    GOALS,
    NUM_TASKS,
    SHAPES,
    TRAIN_VARIANTS,
    Bench,
    Made,
    StepFactory,
    adapted,
    free_memory,
    random_features,
    resident_bytes,
    timed_rounds,
    token_batch,
    train_step_fn,
)
from metalora.train import Engine, EngineConfig, MetaConfig, MultitaskConfig
from metalora.train.batching import micro_batches
from metalora.train.meta import build_sampler, meta_step
from metalora.train.multitask import multitask_step

# --- (a) train steps -------------------------------------------------------------------------------------


def isolated_memory(bench: Bench, make: StepFactory) -> tuple[int, int]:
    """(peak, step growth) of one step built by ``make`` with nothing of other variants alive: after one
    warm-up step, CUDA's peak is ``max_memory_allocated`` (everything on the device: the base, this
    variant's adapter and optimizer state, the step's own tensors); CPU's is resident + saved activations."""
    step, model, opt = make()
    step()
    free_memory(bench.setup)
    growth = bench.step_growth(step)
    peak = (
        torch.cuda.max_memory_allocated(bench.device)
        if bench.setup.cuda
        else resident_bytes(model, opt) + growth
    )
    return peak, growth


def train_variant(bench: Bench, name: str, x: torch.Tensor) -> StepFactory:
    def make() -> Made:
        model = adapted(bench, name)
        step, opt = train_step_fn(bench, model, x)
        return step, model, opt

    return make


def ratio_rows(
    key: str, names: list[str], times: dict[str, float], memory: dict[str, tuple[int, int]]
) -> list[dict]:
    """One row per name: time and memory, and their ratios to the first name's."""
    ref = names[0]
    return [
        {
            key: n,
            "step_s": times[n],
            "time_ratio": times[n] / times[ref],
            "peak_bytes": memory[n][0],
            "peak_ratio": memory[n][0] / memory[ref][0],
            "step_growth_bytes": memory[n][1],
            "growth_ratio": memory[n][1] / max(memory[ref][1], 1),
        }
        for n in names
    ]


def section_a(bench: Bench, deadline: float) -> dict[str, Any]:
    setup = bench.setup
    x = token_batch(bench, setup.batch)
    memory = {name: isolated_memory(bench, train_variant(bench, name, x)) for name in TRAIN_VARIANTS}
    steps = {name: train_variant(bench, name, x)()[0] for name in TRAIN_VARIANTS}
    times, rounds = timed_rounds(steps, bench, deadline, "a", "train steps")
    return {
        "batch": setup.batch,
        "seq": setup.seq,
        "r": setup.r,
        "reference": TRAIN_VARIANTS[0],
        "repeats": rounds,
        "memory_kind": bench.memory_kind(),
        "rows": ratio_rows("adapter", TRAIN_VARIANTS, times, memory),
    }


# --- (d) MeTA-LoRA iteration -----------------------------------------------------------------------------


def engine_for(bench: Bench, model: nn.Module, run_dir: str, max_grad_norm: float | None = None) -> Engine:
    precision = "bf16" if bench.setup.dtype == torch.bfloat16 else "fp32"
    device = "cuda" if bench.setup.cuda else "cpu"
    config = EngineConfig(
        max_steps=10**6,
        lr=1e-4,
        progress=False,
        device=device,
        precision=precision,
        max_grad_norm=max_grad_norm,
    )
    return Engine(model, config, run_dir)


def section_d(bench: Bench, deadline: float) -> dict[str, Any]:
    cfg = MetaConfig(**bench.setup.meta, inner_lr=1e-4)
    per_task = cfg.support_size + cfg.query_size
    pools = {f"t{t}": random_features(bench, per_task, t, seed=10 + t) for t in range(NUM_TASKS)}
    model = adapted(bench, "lora")
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_for(bench, model, tmp)
        model.train()
        sampler = build_sampler(pools, cfg)
        episodes = [sampler.sample() for _ in range(3)]
        raw = [
            [
                b
                for ep in eps
                for b in [micro_batches(ep.support, 0, None)[0]] * cfg.inner_steps
                + micro_batches(ep.query, 0, None)
            ]
            for eps in episodes
        ]
        state = {"meta": 0, "raw": 0}

        def meta_iteration() -> None:
            engine.outer_step(meta_step(engine, episodes[state["meta"] % len(episodes)], cfg, 0), 0)
            state["meta"] += 1

        def raw_passes() -> None:  # the same samples' forward+backward passes, nothing else
            for b in raw[state["raw"] % len(raw)]:
                with engine.autocast():
                    loss = model(
                        **{k: b[k].to(bench.device) for k in ("input_ids", "attention_mask", "labels")}
                    ).loss
                loss.backward()
            model.zero_grad(set_to_none=True)
            state["raw"] += 1

        times, rounds = timed_rounds(
            {"meta": meta_iteration, "raw": raw_passes}, bench, deadline, "d", "iterations"
        )
    return {
        **asdict(cfg),
        "seq": bench.setup.seq,
        "samples_per_iteration": cfg.samples_per_iteration(),
        "meta_iteration_s": times["meta"],
        "raw_fwd_bwd_s": times["raw"],
        "overhead_ratio": times["meta"] / times["raw"],
        "goal": GOALS["meta_overhead_ratio"],
        "repeats": rounds,
    }


# --- (e) throughput and MFU ------------------------------------------------------------------------------


def matmul_parameters(shape: dict[str, int]) -> int:
    """Weights that multiply in a forward of a Llama of ``shape`` (no biases): attention, MLP, LM head."""
    h, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    head_dim, kv = h // heads, shape["num_key_value_heads"]
    attention = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = 3 * h * shape["intermediate_size"]
    return layers * (attention + mlp) + shape["vocab_size"] * h


def attention_flops_per_token(shape: dict[str, int], seq: int) -> int:
    """12·L·H·d_head·s: QKᵀ and AV, forward and backward (PaLM, appendix B)."""
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    return 12 * shape["num_hidden_layers"] * heads * (h // heads) * seq


def model_flops_per_token(shape: dict[str, int], seq: int, adapter_params: int) -> int:
    """6·N + 12·L·H·d_head·s, N = the multiplying weights plus the adapter's."""
    return 6 * (matmul_parameters(shape) + adapter_params) + attention_flops_per_token(shape, seq)


def lora_flops_per_token(shape: dict[str, int], seq: int, adapter_params: int) -> int:
    """4·N_frozen + 6·N_adapter + attention: a frozen weight gets an input gradient but no weight gradient."""
    return 4 * matmul_parameters(shape) + 6 * adapter_params + attention_flops_per_token(shape, seq)


def engine_step_fn(bench: Bench, model: nn.Module, run_dir: str, features: list[dict]) -> Callable[[], None]:
    """One LoRA-MT step on the engine: ``multitask_step`` (collation, forward, backward) + ``outer_step``
    (clip to 1.0, AdamW, schedule)."""
    engine = engine_for(bench, model, run_dir, max_grad_norm=1.0)
    config = MultitaskConfig(batch_size=len(features))
    model.train()

    def step() -> None:
        engine.outer_step(multitask_step(engine, features, config, 0), 0)

    return step


def trainer_run_fn(
    bench: Bench, model: nn.Module, run_dir: str, features: list[dict]
) -> Callable[[int], list[float]]:
    """``run(steps) -> [seconds between consecutive on_step_end]`` of HF ``Trainer`` on the same batch."""

    data = [
        {
            "input_ids": torch.tensor(f["input_ids"]),
            "labels": torch.tensor(f["labels"]),
            "attention_mask": torch.ones(len(f["input_ids"]), dtype=torch.long),
        }
        for f in features
    ]
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(bench.now())

    def run(steps: int) -> list[float]:
        args = TrainingArguments(
            output_dir=run_dir,
            per_device_train_batch_size=len(data),
            max_steps=steps,
            learning_rate=1e-4,
            max_grad_norm=1.0,
            optim="adamw_torch",
            bf16=bench.setup.dtype == torch.bfloat16,
            use_cpu=not bench.setup.cuda,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
        )
        ends.clear()
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary dict
            Trainer(model=model, args=args, train_dataset=data, callbacks=[StepEnds()]).train()
        return [b - a for a, b in zip(ends, ends[1:], strict=False)]

    return run


def section_e(bench: Bench, deadline: float) -> dict[str, Any]:
    setup = bench.setup
    features = [f for i in range(setup.batch) for f in random_features(bench, 1, i % NUM_TASKS, seed=20 + i)]
    ours, theirs = adapted(bench, "lora"), adapted(bench, "peft_lora")
    times: dict[str, list[float]] = {"lora_mt": [], "hf_trainer_peft": []}
    with tempfile.TemporaryDirectory() as tmp:
        step = engine_step_fn(bench, ours, f"{tmp}/engine", features)
        trainer = trainer_run_fn(bench, theirs, f"{tmp}/trainer", features)
        for _ in range(setup.warmup):
            step()
        rounds = 0
        while rounds < 2 or (rounds < setup.repeats and time.monotonic() < deadline):
            times["hf_trainer_peft"] += trainer(setup.repeats + 1)
            for _ in range(setup.repeats):
                t0 = bench.now()
                step()
                times["lora_mt"].append(bench.now() - t0)
            rounds += 1
    adapter = sum(p.numel() for p in ml.adapter_parameters(ours).values())
    return throughput_result(bench, times, adapter, rounds)


def throughput_result(
    bench: Bench, times: dict[str, list[float]], adapter: int, rounds: int
) -> dict[str, Any]:
    setup, shape = bench.setup, SHAPES[bench.setup.shape]
    tokens = setup.batch * setup.seq
    flops = model_flops_per_token(shape, setup.seq, adapter)
    lora_flops = lora_flops_per_token(shape, setup.seq, adapter)
    peak = setup.peak_tflops * 1e12 if setup.peak_tflops else None
    rows = []
    for name, ts in times.items():
        step_s = statistics.median(ts)
        rate = tokens / step_s
        rows.append(
            {
                "method": name,
                "step_s": step_s,
                "tokens_per_s": rate,
                "steps_timed": len(ts),
                "mfu": rate * flops / peak if peak else None,
                "hfu": rate * lora_flops / peak if peak else None,
            }
        )
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return {
        "batch": setup.batch,
        "seq": setup.seq,
        "tokens_per_step": tokens,
        "adapter_params": adapter,
        "matmul_params": matmul_parameters(shape),
        "model_flops_per_token": flops,
        "lora_flops_per_token": lora_flops,
        "peak_tflops": setup.peak_tflops,
        "flops_formula": "6*N + 12*L*H*d_head*s (N: multiplying weights incl. LM head and adapter)",
        "rounds": rounds,
        "rows": rows,
        "tokens_per_s_ratio": speedup,
        "goal": GOALS["lora_mt_vs_trainer_tokens_per_s"],
    }
