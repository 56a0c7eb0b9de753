"""The GPU benchmark (issue 17 item 5): random-init LLaMA2-7B-shaped models in bf16, nothing downloaded.

    PYTHONPATH=. python benchmarks/gpu.py                  # one H200: < 8 min, writes results/gpu.json
    PYTHONPATH=. python benchmarks/gpu.py --tiny           # the same code on CPU, tiny shape (CI), temp JSON
    python benchmarks/gpu.py --markdown [--out FILE]       # the tables from the stored JSON, running nothing

Every section is one function; one that fails records its error and the others still run. Ratios are
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
    +2–4%.
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
import contextlib
import copy
import gc
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROCESS_START = time.monotonic()  # --budget-s counts the imports too
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-init models only: nothing is downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # metalora from the repo root
from common import RESULTS, SavedTensorBytes, generated, machine, markdown_table  # noqa: E402

import metalora as ml  # noqa: E402
from metalora.adapters.api import config_from_dict  # noqa: E402
from metalora.data import collate  # noqa: E402
from metalora.train import Engine, EngineConfig, MetaConfig, MultitaskConfig  # noqa: E402
from metalora.train.batching import micro_batches  # noqa: E402
from metalora.train.loss import forward_losses  # noqa: E402
from metalora.train.meta import build_sampler, meta_step  # noqa: E402
from metalora.train.multitask import multitask_step  # noqa: E402
from metalora.train.reweight import ReweightConfig, Reweighting, resolve_scheme  # noqa: E402

SCHEMA = 1
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
NUM_TASKS = 4
H200_BF16_DENSE_TFLOPS = 989.0
SHAPES: dict[str, dict[str, int]] = {
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 256,
        "max_position_embeddings": 128,
    },
}
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "dora": ("lora", {"use_dora": True}),
    "mtl_lora": ("mtl_lora", {"num_tasks": NUM_TASKS, "num_up": 3}),
    "hydra_lora": ("hydra_lora", {"num_heads": 3}),
    "multilora": ("multilora", {"num_parallel": 3}),
    "moelora": ("moelora", {"num_tasks": NUM_TASKS, "num_experts": 4}),
}
TRAIN_VARIANTS = ["peft_lora", "mtl_lora", "hydra_lora", "moelora", "multilora", "dora"]
SEARCH_TOLERANCE = 1 / 32  # (f) stops bisecting at a bracket of 3%
INFER_VARIANTS = ["merged_lora", "mtl_lora", "moelora", "hydra_lora", "dora"]
SECTION_WEIGHTS = {"a": 1.0, "b": 1.5, "c": 0.5, "d": 1.0, "e": 1.2, "f": 2.8}
SECTION_KEYS = {
    "a": "a_train_step",
    "b": "b_inference",
    "c": "c_reweight_memory",
    "d": "d_meta",
    "e": "e_throughput",
    "f": "f_max_batch",
}
GOALS = {
    "mtl_lora_train_time_ratio": 1.10,
    "mtl_lora_inference_batch8_ratio": 1.15,
    "reweight_peak_ratio": 1.04,
    "meta_overhead_ratio": 1.05,
    "lora_mt_vs_trainer_tokens_per_s": 1.3,
}


# --- the run's settings, clock and budget -------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run's sections read: shape, device, sizes, repeats."""

    shape: str
    device: str
    batch: int
    seq: int
    r: int
    infer_batches: list[int]
    prefill: int
    decode_steps: int
    repeats: int
    warmup: int
    budget_s: float
    meta: dict[str, int]
    peak_tflops: float | None
    cpu_limit_bytes: int
    max_batch: int
    min_section_s: float

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def make_setup(args: argparse.Namespace) -> Setup:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and not device.startswith("cuda"):
        raise SystemExit("gpu.py: the LLaMA2-7B shape needs a CUDA device; use --tiny on a CPU")
    cuda = device.startswith("cuda")
    tiny = args.tiny
    return Setup(
        shape="tiny" if tiny else "llama2-7b",
        device=device,
        batch=2 if tiny else 8,
        seq=32 if tiny else 512,
        r=16,
        infer_batches=[1, 2, 4] if tiny else [1, 2, 4, 8, 16, 32],
        prefill=16 if tiny else 256,
        decode_steps=4 if tiny else 16,
        repeats=args.repeats or (3 if tiny else 5),
        warmup=1 if tiny else 2,
        budget_s=args.budget_s,
        meta={
            "n_tasks": 2,
            "inner_steps": 3,
            "support_size": 2 if tiny else 8,
            "query_size": 2 if tiny else 8,
        },
        peak_tflops=(args.peak_tflops or H200_BF16_DENSE_TFLOPS) if cuda else None,
        cpu_limit_bytes=int(args.cpu_limit_mib * 2**20),
        max_batch=256 if tiny else 4096,
        min_section_s=0.0 if tiny else 5.0,
    )


class Budget:
    """The run's time: each section gets a share of what is left, weighted by ``SECTION_WEIGHTS``."""

    def __init__(
        self, total_s: float, clock: Callable[[], float] = time.monotonic, start: float | None = None
    ) -> None:
        self.total_s, self.clock = total_s, clock
        self.start = clock() if start is None else start
        self.skipped: list[dict[str, str]] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def section_deadline(self, section: str, left: list[str]) -> float:
        share = SECTION_WEIGHTS[section] / sum(SECTION_WEIGHTS[s] for s in left)
        return self.clock() + max(self.remaining(), 0.0) * share

    def skip(self, section: str, what: str, reason: str) -> None:
        self.skipped.append({"section": section, "what": what, "reason": reason})


def share_deadline(deadline: float, parts_left: int, clock: Callable[[], float] = time.monotonic) -> float:
    """The deadline of the next of ``parts_left`` equal parts of the time until ``deadline``."""
    return clock() + max(deadline - clock(), 0.0) / max(parts_left, 1)


class Bench:
    """What the sections share: the setup, the budget, the frozen base model (built once), timing and memory."""

    def __init__(self, setup: Setup, budget: Budget) -> None:
        self.setup, self.budget = setup, budget
        self.device = torch.device(setup.device)
        self._base: nn.Module | None = None

    def sync(self) -> None:
        if self.setup.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.setup.dtype == torch.bfloat16
        )

    def base(self) -> nn.Module:
        if self._base is None:
            self._base = build_base(self.setup)
        return self._base

    def release_base(self) -> None:
        self._base = None
        free_memory(self.setup)

    def memory_kind(self) -> str:
        return "cuda_max_memory_allocated" if self.setup.cuda else "cpu_resident_plus_saved_activations"

    def step_growth(self, fn: Callable[[], None]) -> int:
        """Bytes a call adds at its peak (CUDA: max allocated minus allocated before; CPU: saved activations)."""
        if not self.setup.cuda:
            with SavedTensorBytes() as saved:
                fn()
            return saved.bytes
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - before


def free_memory(setup: Setup) -> None:
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()


# --- timing ----------------------------------------------------------------------------------------------


def timed_rounds(
    fns: dict[str, Callable[[], None]], bench: Bench, deadline: float, section: str, what: str
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each function, round-robin after ``setup.warmup`` calls each: at most
    ``setup.repeats`` rounds, none begun that the last round's length says would end after ``deadline``
    (the first always runs); a cut is recorded in the budget's ``skipped``. Returns (medians, rounds)."""
    setup = bench.setup
    for fn in fns.values():
        for _ in range(setup.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(setup.repeats):
        last_round = sum(v[-1] for v in times.values()) if i else 0.0
        if i and time.monotonic() + last_round > deadline:
            bench.budget.skip(section, what, f"{i} of {setup.repeats} repeats: the section's time was up")
            break
        for name, fn in fns.items():
            t0 = bench.now()
            fn()
            times[name].append(bench.now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, len(next(iter(times.values())))


# --- models --------------------------------------------------------------------------------------------


def llama_config(shape: str) -> LlamaConfig:
    cfg = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    cfg.use_cache = False
    return cfg


def build_base(setup: Setup) -> nn.Module:
    """A random-init Llama of the setup's shape, built directly on the device in the setup's dtype."""
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = AutoModelForCausalLM.from_config(llama_config(setup.shape), dtype=setup.dtype)
    return model.requires_grad_(False).train()


def share_base(base: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``base`` whose parameters are ``base``'s own tensors (shared, no memory), except those of
    modules whose name ends with one of ``own`` (copied: a merge writes into them)."""
    memo = {id(p): p for n, p in base.named_parameters() if not (own and n.rpartition(".")[0].endswith(own))}
    return copy.deepcopy(base, memo)


def nudge_adapter(model: nn.Module, scale: float = 1e-3) -> None:
    """Non-zero adapter tensors (B = 0 at init would make branches trivially zero)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * scale)


def adapted(bench: Bench, name: str) -> nn.Module:
    """A variant on a copy of the shared base: ``peft_lora`` (``peft.get_peft_model``), ``merged_lora``
    (metalora LoRA merged into its own copy of q,k,v,o: a plain HF model), or an ``ADAPTERS`` entry."""
    r = bench.setup.r
    if name == "peft_lora":
        model = share_base(bench.base())
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=QKVO))
        nudge_adapter(model)
        return model
    merged = name == "merged_lora"
    model = share_base(bench.base(), tuple(QKVO) if merged else ())
    kind, extra = ADAPTERS["lora" if merged else name]
    ml.add_adapter(
        model, config_from_dict(kind, {"r": r, "alpha": 2 * r, "target_modules": QKVO, **extra}), seed=0
    )
    nudge_adapter(model)
    if merged:
        model = ml.merge(model, inplace=True).requires_grad_(False)  # merge leaves every tensor trainable
    return model


def routing(model: nn.Module, batch: int) -> contextlib.AbstractContextManager:
    """Mixed tasks (sample i has task i mod 4) for task-routed adapters; nothing for the others."""
    if not ml.is_task_routed(model):
        return contextlib.nullcontext()
    return ml.task_ids(model, torch.arange(batch) % NUM_TASKS)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared tensor counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """The model's tensors (parameters and buffers) and the optimizer's state."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return tensor_bytes(tensors)


def token_batch(bench: Bench, batch: int, seq: int | None = None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = SHAPES[bench.setup.shape]["vocab_size"]
    return torch.randint(3, vocab, (batch, seq or bench.setup.seq), generator=gen).to(bench.device)


def random_features(bench: Bench, n: int, task: int, seed: int) -> list[dict[str, Any]]:
    """Tokenized features (the data contract's dicts), every position a label, one length: no padding."""
    rows = token_batch(bench, n, seed=seed).cpu().tolist()
    return [
        {"input_ids": ids, "labels": list(ids), "task_id": task, "sample_id": f"t{task}/{i}"}
        for i, ids in enumerate(rows)
    ]


def train_step_fn(
    bench: Bench, model: nn.Module, x: torch.Tensor
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """(one forward + backward + AdamW step of ``model`` on ``x`` (labels = x), its optimizer)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()

    def step() -> None:
        with routing(model, x.shape[0]):
            with bench.autocast():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


# --- (a) train steps -------------------------------------------------------------------------------------


Made = tuple[Callable[[], None], nn.Module, torch.optim.Optimizer]
"""A step, its model and its optimizer."""
StepFactory = Callable[[], Made]


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


# --- (b) inference latency -------------------------------------------------------------------------------


def first_present(out: Any, keys: tuple[str, ...]) -> Any:
    return next(out[k] for k in keys if k in out)


def generate_fn(bench: Bench, model: nn.Module, batch: int, prefill_times: list[float]) -> Callable[[], None]:
    """Prefill ``setup.prefill`` tokens, then ``setup.decode_steps`` greedy steps on the KV cache; appends
    the prefill's seconds to ``prefill_times``."""
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    prompt = token_batch(bench, batch, bench.setup.prefill, seed=batch)

    @torch.no_grad()
    def run() -> None:
        with routing(model, batch), bench.autocast():
            t0 = bench.now()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            prefill_times.append(bench.now() - t0)
            for _ in range(bench.setup.decode_steps):
                cache = first_present(out, ("cache", "past_key_values"))
                token = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_kw: cache})

    return run


def section_b(bench: Bench, deadline: float) -> dict[str, Any]:
    setup = bench.setup
    models = {name: adapted(bench, name).eval() for name in INFER_VARIANTS}
    rows = []
    for i, batch in enumerate(setup.infer_batches):
        prefill: dict[str, list[float]] = {name: [] for name in models}
        fns = {name: generate_fn(bench, m, batch, prefill[name]) for name, m in models.items()}
        part = share_deadline(deadline, len(setup.infer_batches) - i)
        total, rounds = timed_rounds(fns, bench, part, "b", f"batch {batch}")
        for name in models:
            pre = statistics.median(prefill[name][-rounds:])
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "latency_s": total[name],
                    "prefill_s": pre,
                    "decode_step_s": (total[name] - pre) / setup.decode_steps,
                    "latency_ratio": total[name] / total["merged_lora"],
                    "repeats": rounds,
                }
            )
    return {
        "prefill_tokens": setup.prefill,
        "decode_steps": setup.decode_steps,
        "batch_sizes": setup.infer_batches,
        "reference": "merged_lora",
        "rows": rows,
    }


# --- (c) reweighting memory ------------------------------------------------------------------------------


def reweight_factories(bench: Bench, model: nn.Module) -> dict[str, StepFactory]:
    """Makers of a plain LoRA step (mean of per-sample losses) and of a reweighting step (``Reweighting``:
    validation pass, training pass, Eq. 8, fused update) on the same batch of ``model``, each with its own
    AdamW."""
    n = bench.setup.batch
    batch = collate(random_features(bench, n, 0, seed=0), 0)
    vbatch = collate(random_features(bench, n, 0, seed=1), 0)
    params = list(ml.adapter_parameters(model).values())

    def context(_: dict[str, Any]) -> contextlib.AbstractContextManager:
        return bench.autocast()

    def plain() -> Made:
        opt = torch.optim.AdamW(params, lr=1e-6)

        def step() -> None:
            with bench.autocast():
                losses, _ = forward_losses(model, batch)
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, model, opt

    def reweight() -> Made:
        opt = torch.optim.AdamW(params, lr=1e-6)
        reweighting = Reweighting(model, ReweightConfig.from_dict({"batch_size": n}))

        def step() -> None:
            val = reweighting.validation_stats(vbatch, n, context)
            reweighting.gradient(batch, val, n, context)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, model, opt

    return {"lora": plain, "reweight": reweight}


def section_c(bench: Bench, deadline: float) -> dict[str, Any]:
    model = adapted(bench, "lora")
    model.train()
    makers = reweight_factories(bench, model)
    memory = {k: isolated_memory(bench, make) for k, make in makers.items()}
    steps = {k: make()[0] for k, make in makers.items()}
    times, rounds = timed_rounds(steps, bench, deadline, "c", "steps")
    setup = bench.setup
    return {
        "batch": setup.batch,
        "val_batch": setup.batch,
        "seq": setup.seq,
        "scheme": resolve_scheme(model, ReweightConfig.from_dict({"batch_size": setup.batch})),
        "paper_table3": "+2-4%",
        "goal": GOALS["reweight_peak_ratio"],
        "memory_kind": bench.memory_kind(),
        "repeats": rounds,
        "rows": ratio_rows("step", list(makers), times, memory),
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


# --- (f) the largest batch -------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """``largest``: the largest batch seen to fit (0: none); ``failing``: the smallest seen to fail (None:
    none failed up to ``max_batch``); ``capped``: the time ran out before the bracket closed."""

    largest: int
    failing: int | None
    trials: list[tuple[int, bool]] = field(default_factory=list)
    capped: bool = False


def largest_batch(
    fits: Callable[[int], bool],
    start: int = 1,
    *,
    growth: float = 2.0,
    max_batch: int = 4096,
    tolerance: float = 0.0,
    deadline: float = math.inf,
    cost: Callable[[int], float] = lambda batch: 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Grow by ``growth`` (doubling) from ``start`` until a batch fails (or shrink until one fits), then
    bisect until the bracket is at most ``max(1, tolerance·largest)`` wide. After the first trial, none
    begins that ``cost`` (its expected seconds) says would end after ``deadline``. ``fits`` must be
    monotone: a batch that fits means every smaller one fits."""
    res = SearchResult(largest=0, failing=None)

    def trial(b: int) -> bool | None:
        if res.trials and clock() + cost(b) > deadline:
            res.capped = True
            return None
        ok = fits(b)
        res.trials.append((b, ok))
        if ok:
            res.largest = max(res.largest, b)
        else:
            res.failing = b if res.failing is None else min(res.failing, b)
        return ok

    b = max(1, min(start, max_batch))
    ok = trial(b)
    while ok and b < max_batch:
        b = min(max_batch, max(b + 1, int(b * growth)))
        ok = trial(b)
    while ok is False and b > 1 and res.largest == 0:
        b = max(1, int(b / growth))
        ok = trial(b)
    while (
        ok is not None
        and res.failing is not None
        and res.failing - res.largest > max(1, tolerance * res.largest)
    ):
        ok = trial((res.largest + res.failing) // 2)
    return res


def quantize_nf4_(model: nn.Module, setup: Setup) -> int:
    """Replace every decoder ``nn.Linear`` by a ``bitsandbytes`` NF4 ``Linear4bit`` holding its weight
    (quantized as it is moved to the device); the LM head stays as it is, as in QLoRA. Returns the count."""
    import bitsandbytes as bnb  # optional: (f)'s NF4 row records the error where it is missing

    compute = torch.bfloat16 if setup.dtype == torch.bfloat16 else torch.float32
    count = 0
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=False,
                compute_dtype=compute,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            setattr(parent, name, q.to(setup.device))
            count += 1
    return count


def checkpointed(model: nn.Module) -> nn.Module:
    """HF's gradient checkpointing, non-reentrant (the engine's ``train.gradient_checkpointing`` to come)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_model(bench: Bench, nf4: bool) -> nn.Module:
    """A fresh random base (NF4-quantized if asked) with metalora's LoRA, r 16 on q,k,v,o."""
    base = build_base(bench.setup)
    if nf4:
        quantize_nf4_(base, bench.setup)
    r = bench.setup.r
    ml.add_adapter(base, config_from_dict("lora", {"r": r, "alpha": 2 * r, "target_modules": QKVO}), seed=0)
    return base.train()


class StepProbe:
    """``probe(batch)``: the step growth of one LoRA train step at ``batch`` × seq, or None on CUDA
    out-of-memory (gradients dropped and the cache emptied); ``seconds_per_sample`` from the last step
    that ran to the end."""

    def __init__(self, bench: Bench, model: nn.Module) -> None:
        self.bench, self.model = bench, model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        self.seconds_per_sample = 0.0

    def _step(self, x: torch.Tensor) -> None:
        with self.bench.autocast():
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self, batch: int) -> int | None:
        x = token_batch(self.bench, batch)
        t0 = self.bench.now()
        try:
            growth = self.bench.step_growth(lambda: self._step(x))
            self.seconds_per_sample = (self.bench.now() - t0) / batch
            return growth
        except torch.cuda.OutOfMemoryError:
            pass  # clean up outside the handler: its traceback holds the step's tensors
        self.opt.zero_grad(set_to_none=True)
        free_memory(self.bench.setup)
        return None


def search_variant(bench: Bench, model: nn.Module, deadline: float) -> dict[str, Any]:
    """Predict the largest batch from the growth at batches 1 and 2, then ``largest_batch`` from 0.9 of it.
    The limit: CUDA's out-of-memory (the device's whole memory); CPU: resident + saved ≤ --cpu-limit-mib."""
    setup = bench.setup
    probe = StepProbe(bench, model)
    g1, g2 = probe(1), probe(2)
    if g1 is None or g2 is None:
        return {
            "largest_batch": 0,
            "first_failing_batch": 1 if g1 is None else 2,
            "capped": False,
            "trials": [],
        }
    resident = resident_bytes(model, probe.opt)
    limit = torch.cuda.mem_get_info(bench.device)[1] if setup.cuda else setup.cpu_limit_bytes
    per_sample = max(g2 - g1, 1)
    predicted = max(1, int((limit - resident - (g1 - per_sample)) // per_sample))

    def fits(batch: int) -> bool:
        growth = probe(batch)
        return growth is not None and (setup.cuda or resident + growth <= limit)

    t0 = time.monotonic()
    res = largest_batch(
        fits,
        int(0.9 * predicted),
        max_batch=setup.max_batch,
        tolerance=SEARCH_TOLERANCE,
        deadline=deadline,
        cost=lambda b: b * probe.seconds_per_sample,
    )
    if res.capped:
        bench.budget.skip("f", "search", f"bracket [{res.largest}, {res.failing}) left open: time share used")
    return {
        "largest_batch": res.largest,
        "first_failing_batch": res.failing,
        "capped": res.capped,
        "trials": [list(t) for t in res.trials],
        "predicted": predicted,
        "per_sample_bytes": per_sample,
        "resident_bytes": resident,
        "limit_bytes": limit,
        "search_s": time.monotonic() - t0,
    }


def section_f(bench: Bench, deadline: float) -> dict[str, Any]:
    bench.release_base()  # only the searched model may be on the device
    variants = ["plain", "grad_ckpt", "nf4"]
    rows, model = [], None
    for i, variant in enumerate(variants):
        part = share_deadline(deadline, len(variants) - i)
        try:
            if variant == "grad_ckpt" and model is not None:
                model = checkpointed(model)  # the plain model, checkpointed
            else:
                model = None  # let the previous model go before the next is built
                free_memory(bench.setup)
                model = lora_model(bench, nf4=variant == "nf4")
                model = checkpointed(model) if variant == "grad_ckpt" else model
            rows.append({"variant": variant, "error": None, **search_variant(bench, model, part)})
        except Exception as exc:  # noqa: BLE001 - one variant (bitsandbytes missing, say) must not stop the rest
            rows.append({"variant": variant, "error": error_text(exc)})
            model = None
        free_memory(bench.setup)
    return {
        "seq": bench.setup.seq,
        "memory_kind": bench.memory_kind(),
        "growth": 2.0,
        "tolerance": SEARCH_TOLERANCE,
        "rows": rows,
    }


# --- the run -----------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Bench, float], dict[str, Any]]] = {
    "a": section_a,
    "b": section_b,
    "c": section_c,
    "d": section_d,
    "e": section_e,
    "f": section_f,
}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


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
        f"(c) reweighting ({e['scheme']}, batch {e['batch']} + {e['val_batch']} validation, {e['seq']} tokens)"
        f"; paper {e['paper_table3']}, goal ≤ {e['goal']}; memory: {e['memory_kind']}"
    )
    return title + "\n\n" + ratio_table(e, "step", "LoRA")


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
