"""``benchmarks/gpu.py`` section (b): inference latency against batch size (MTL-LoRA's Fig. 4)."""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gpubench.base import INFER_VARIANTS, Bench, adapted, routing, share_deadline, timed_rounds, token_batch

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
