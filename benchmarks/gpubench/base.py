"""``benchmarks/gpu.py``'s shared parts: shapes and adapters, the run's settings, clock and budget, timing, and
the models every section builds (random-init LLaMA shapes, shared frozen base tensors)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
from common import SavedTensorBytes
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import metalora as ml
from metalora.adapters.api import config_from_dict

SCHEMA = 1
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ATTENTION_AND_MLP = [*QKVO, "gate_proj", "up_proj", "down_proj"]
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


def adapted(bench: Bench, name: str, r: int | None = None, targets: list[str] = QKVO) -> nn.Module:
    """A variant on a copy of the shared base: ``peft_lora`` (``peft.get_peft_model``), ``merged_lora``
    (metalora LoRA merged into its own copy of q,k,v,o: a plain HF model), or an ``ADAPTERS`` entry; rank
    ``r`` (default the setup's) on ``targets`` (default q,k,v,o; not for the two PEFT-side variants)."""
    r = r or bench.setup.r
    if name == "peft_lora":
        model = share_base(bench.base())
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=QKVO))
        nudge_adapter(model)
        return model
    merged = name == "merged_lora"
    model = share_base(bench.base(), tuple(QKVO) if merged else ())
    kind, extra = ADAPTERS["lora" if merged else name]
    modules = QKVO if merged else targets
    ml.add_adapter(
        model, config_from_dict(kind, {"r": r, "alpha": 2 * r, "target_modules": modules, **extra}), seed=0
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


Made = tuple[Callable[[], None], nn.Module, torch.optim.Optimizer]
"""A step, its model and its optimizer."""
StepFactory = Callable[[], Made]


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]
