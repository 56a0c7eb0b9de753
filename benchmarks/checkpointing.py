"""Gradient checkpointing (issue 17 item 2): the activation memory it saves and the step time it costs.

    python benchmarks/checkpointing.py                # SmolLM2-135M, batch 8 × 256 tokens; writes results/checkpointing.json
    python benchmarks/checkpointing.py --model tiny   # a smoke run on a tiny random-init Llama (seconds)
    python benchmarks/checkpointing.py --markdown     # the doc's table from the JSON, running nothing

One step each of LoRA-MT, META-LoRA reweighting (the fused scheme; a validation batch as large as the
training batch, the library's default) and MeTA-LoRA (n = 2 tasks, k = 1 inner step, |S| = |Q| = 8), run
through the library's own step functions on an ``Engine``, with and without ``train.gradient_checkpointing``,
side by side in one process on two identical copies of the model (LoRA r = 16 on q, k, v, o):

* **held activation bytes**: the peak over the step of the bytes autograd holds for the backward, counted
  exactly with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once while any saved reference to
  it lives; the frozen weights autograd also saves are parameters, not activations, and are left out).
  With checkpointing that is each decoder layer's input (the checkpoint saves it through the same hooks);
  the backward then recomputes one layer at a time, whose saved tensors live only while that layer's
  backward runs: ``recompute_layer_bytes`` (the largest layer's, counted without checkpointing) bounds that
  transient, so ``held + recompute_layer_bytes`` bounds the checkpointed step's activation peak.
* **step time**: this process's CPU time per step (``time.process_time``: one intra-op thread, so
  neighbours on a shared machine do not count), median of round-robin repeats, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it (no hub on these machines)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, generated, interleaved_medians, machine, markdown_table, save, table  # noqa: E402
from reweight_common import nudge_b  # noqa: E402

import metalora as ml  # noqa: E402
from metalora.adapters.targets import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from metalora.models import load_base  # noqa: E402
from metalora.testing import tiny_llama  # noqa: E402
from metalora.train import Engine, EngineConfig, MetaConfig, MultitaskConfig  # noqa: E402
from metalora.train.meta import build_sampler, meta_step  # noqa: E402
from metalora.train.multitask import EpochBatches, multitask_step  # noqa: E402
from metalora.train.reweight import ReweightBatches, ReweightConfig, Reweighter  # noqa: E402

RESULTS_FILE = RESULTS / "checkpointing.json"
ALGORITHMS = ("lora_mt", "reweight", "meta")
LABELS = {"lora_mt": "LoRA-MT", "reweight": "reweighting (fused)", "meta": "MeTA-LoRA (n=2, k=1)"}
R = 16
META = {"n_tasks": 2, "inner_steps": 1, "support_size": 8, "query_size": 8, "inner_lr": 1e-4}


# --- counting the bytes autograd holds -------------------------------------------------------------------


class _Held:
    """What the pack hook hands autograd: the tensor, and its release when autograd drops it."""

    __slots__ = ("key", "owner", "tensor")

    def __init__(self, owner: HeldSavedBytes, key: int, tensor: torch.Tensor) -> None:
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self) -> None:
        self.owner.release(self.key)


class HeldSavedBytes:
    """Peak bytes autograd holds for backward inside the block, parameters excluded, each storage once.

    ``layers``: modules (decoder layers) to attribute first-saved bytes to, as ``per_layer``."""

    def __init__(self, model: nn.Module, layers: list[nn.Module] | None = None) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage → [bytes, references]
        self.current = self.peak = 0
        self.per_layer = [0] * len(layers or [])
        self._layer: int | None = None
        self._handles = []
        for i, layer in enumerate(layers or []):
            self._handles.append(layer.register_forward_pre_hook(lambda *_, i=i: self._enter(i)))
            self._handles.append(layer.register_forward_hook(lambda *_: self._enter(None)))

    def _enter(self, layer: int | None) -> None:
        self._layer = layer

    def pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self.params:
            return t
        entry = self.live.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
            if self._layer is not None:
                self.per_layer[self._layer] += entry[0]
        entry[1] += 1
        return _Held(self, key, t)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def measure(self, fn: Callable[[], None]) -> int:
        """Run ``fn`` under the hooks; the peak held bytes."""
        with torch.autograd.graph.saved_tensors_hooks(
            self.pack, lambda h: h if torch.is_tensor(h) else h.tensor
        ):
            fn()
        for handle in self._handles:
            handle.remove()
        return self.peak


# --- the model, the data and the steps --------------------------------------------------------------------


@dataclass
class Data:
    train: list[dict]
    val: list[dict]
    pools: dict[str, list[dict]]


def load_model(name: str) -> tuple[nn.Module, int, int]:
    """(model with LoRA r=16 on q,k,v,o and nudged up-projections, pad id, vocabulary size), same every call."""
    if name == "tiny":
        model, pad, vocab = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4), 0, 64
    else:
        model, tok = load_base(name)
        pad, vocab = tok.pad_token_id, model.config.vocab_size
    ml.add_adapter(
        model, ml.LoRAConfig(r=R, alpha=2 * R, target_modules=list(DEFAULT_ATTENTION_TARGETS)), seed=0
    )
    nudge_b(model)  # B ≠ 0, as after a few steps: reweighting's scores are then not all zero
    return model, pad, vocab


def features(n: int, seq: int, vocab: int, seed: int, task: str = "t0", task_id: int = 0) -> list[dict]:
    """``n`` random sequences of ``seq`` tokens, the first half a masked prompt (cost depends on shape only)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (seq,), generator=gen).tolist()
        labels = [-100] * (seq // 2) + ids[seq // 2 :]
        out.append({"input_ids": ids, "labels": labels, "task_id": task_id, "sample_id": f"{task}/{i}"})
    return out


def make_data(batch: int, seq: int, vocab: int) -> Data:
    size = META["support_size"] + META["query_size"]
    pools = {f"t{t}": features(size, seq, vocab, 10 + t, f"t{t}", t) for t in range(META["n_tasks"])}
    return Data(features(batch, seq, vocab, 1), features(batch, seq, vocab, 2, "v"), pools)


def step_fn(algorithm: str, engine: Engine, data: Data, pad: int) -> Callable[[], None]:
    """One whole step of ``algorithm`` on ``engine``: its gradient, then the engine's AdamW step."""
    batch = len(data.train)
    if algorithm == "lora_mt":
        batches, cfg = EpochBatches(data.train, batch, seed=0), MultitaskConfig(batch_size=batch)
        return lambda: engine.outer_step(multitask_step(engine, batches.sample(), cfg, pad), 0)
    if algorithm == "reweight":
        rw_cfg = ReweightConfig.from_dict({"batch_size": batch, "log_weights": False})
        reweighter = Reweighter(engine, ReweightBatches(data.train, data.val, rw_cfg), rw_cfg, pad)
        return lambda: engine.outer_step(reweighter.step(0), 0)
    meta_cfg = MetaConfig(**META)
    sampler = build_sampler(data.pools, meta_cfg)
    return lambda: engine.outer_step(meta_step(engine, sampler.sample(), meta_cfg, pad), 0)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules HF checkpoints, one per decoder layer."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


# --- the measurement ---------------------------------------------------------------------------------------


def measure(model_name: str, batch: int, seq: int, repeats: int) -> dict[str, Any]:
    """Both sides of every algorithm: held activation bytes of one step, then interleaved step times."""
    torch.manual_seed(0)
    sides: dict[str, tuple[nn.Module, Engine]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    for side, on in (("off", False), ("on", True)):
        model, pad, vocab = load_model(model_name)
        cfg = EngineConfig(device="cpu", lr=1e-4, progress=False, gradient_checkpointing=on)
        sides[side] = (model, Engine(model, cfg, tmp / side))
        model.train()
    data = make_data(batch, seq, vocab)
    rows = {}
    for algorithm in ALGORITHMS:
        fns = {side: step_fn(algorithm, engine, data, pad) for side, (_, engine) in sides.items()}
        held = {side: HeldSavedBytes(model).measure(fns[side]) for side, (model, _) in sides.items()}
        seconds = interleaved_medians(fns, repeats, warmup=0, clock=time.process_time)
        rows[algorithm] = {
            "held_bytes_off": held["off"],
            "held_bytes_on": held["on"],
            "held_ratio": held["on"] / held["off"],
            "step_s_off": seconds["off"],
            "step_s_on": seconds["on"],
            "time_ratio": seconds["on"] / seconds["off"],
        }
        print(json.dumps({algorithm: rows[algorithm]}), flush=True)
    return {"rows": rows, "recompute_layer_bytes": recompute_layer_bytes(sides["off"], data, pad)}


def recompute_layer_bytes(side: tuple[nn.Module, Engine], data: Data, pad: int) -> int:
    """The most bytes one decoder layer saves in a LoRA-MT step without checkpointing (what the checkpointed
    backward holds at a time while it recomputes and differentiates that layer)."""
    model, engine = side
    counter = HeldSavedBytes(model, decoder_layers(model))
    counter.measure(step_fn("lora_mt", engine, data, pad))
    return max(counter.per_layer)


# --- output ---------------------------------------------------------------------------------------------


def rows_for_print(stored: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"step": LABELS[a], **r} for a, r in stored["rows"].items()]


def markdown(stored: dict[str, Any]) -> str:
    """The doc's table, printed from ``results/checkpointing.json``."""
    mib = 2**20
    layer = stored["recompute_layer_bytes"] / mib
    cells = [
        [
            LABELS[a],
            f"{r['held_bytes_off'] / mib:.0f} MiB",
            f"{r['held_bytes_on'] / mib:.0f} MiB (+{layer:.0f} MiB recompute)",
            f"**{r['held_ratio']:.3f}**",
            f"{r['step_s_off']:.1f} s",
            f"{r['step_s_on']:.1f} s",
            f"**{r['time_ratio']:.2f}**",
        ]
        for a, r in stored["rows"].items()
    ]
    header = ["step", "activations held, off", "on", "ratio", "CPU s/step, off", "on", "ratio"]
    return markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="a load_base name, or 'tiny' for a smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. that the machine was shared)")
    parser.add_argument("--markdown", action="store_true", help="run nothing: the doc's table from the JSON")
    args = parser.parse_args()
    if args.markdown:
        stored = json.loads(RESULTS_FILE.read_text())
        print(generated("python benchmarks/checkpointing.py --markdown", "checkpointing", markdown(stored)))
        return
    torch.set_num_threads(1)
    started = time.time()
    out = {
        "machine": machine(),
        "note": args.note,
        "load_average_at_start": os.getloadavg(),
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "r": R,
        "meta": META,
        "repeats": args.repeats,
        **measure(args.model, args.batch, args.seq, args.repeats),
    }
    out["wall_s"] = time.time() - started
    print(table(rows_for_print(out), ["step", *next(iter(out["rows"].values()))]))
    print(markdown(out))
    if args.model != "tiny":
        print(f"wrote {save('checkpointing', out)}")


if __name__ == "__main__":
    main()
