"""What the META-LoRA reweighting benchmarks share: the model, real batches, the training calls, the scoring
(the library's ``evaluate_tasks``), the noisy-label corruption, the options several experiments take, and
``results/reweight.json`` (keys built from each experiment's config, merged into the stored file).

The experiments, one file each (``benchmarks/reweight.py --parts ...`` runs several in one process):
``reweight_memory.py`` (a), ``reweight_time.py`` (b), ``reweight_noisy_labels.py`` (c),
``reweight_probe.py`` (probe), ``reweight_table2.py`` (d).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it (no hub on these machines)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save  # noqa: E402

import metalora as ml  # noqa: E402
from metalora.adapters import adapter_parameters  # noqa: E402
from metalora.adapters.targets import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from metalora.data import Example, Task, collate, load_task, tokenize_examples  # noqa: E402
from metalora.data.templates import format_mc_response  # noqa: E402
from metalora.eval.tasks import evaluate_tasks  # noqa: E402
from metalora.models import load_base  # noqa: E402
from metalora.train import EngineConfig, MultitaskConfig, train_multitask  # noqa: E402
from metalora.train.loss import forward_losses  # noqa: E402
from metalora.train.reweight import ReweightConfig, Reweighting, train_reweight  # noqa: E402

MODEL_ENV = "METALORA_BENCH_MODEL"  # --model sets it, so the fresh processes of (a) load the same model
DEFAULT_MODEL = "smollm2-135m"
MAX_LEN = 128  # (a), (b); (c) and (d) train at TRAIN_MAX_LEN
TRAIN_MAX_LEN = 64
R = 16
TRAIN_BATCH = 8
VAL_BATCH = 1  # 8:1, the closest to the default 10:1 at this batch
RESULTS_FILE = RESULTS / "reweight.json"
STYLES = ["letter_text", "letter", "text"]


def model_name() -> str:
    """The benchmarked model: ``--model`` (through ``METALORA_BENCH_MODEL``), SmolLM2-135M by default."""
    return os.environ.get(MODEL_ENV, DEFAULT_MODEL)


def load_model(seed: int = 0, r: int = R, targets: tuple[str, ...] = tuple(DEFAULT_ATTENTION_TARGETS)):
    """(model with LoRA r (16) on ``targets`` (q,k,v,o), tokenizer), the adapter initialised after
    ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    model, tok = load_base(model_name())
    ml.add_adapter(model, ml.LoRAConfig(r=r, alpha=2 * r, target_modules=list(targets)))
    return model, tok


def nudge_b(model, scale: float = 1e-3, seed: int = 0) -> None:
    """Non-zero up-projections, as after a few steps (at B = 0 the low-rank scores are all zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter_parameters(model).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def features(tok, examples, task_to_id=None, max_length: int = MAX_LEN):
    feats, _ = tokenize_examples(examples, tok, task_to_id, max_length=max_length)
    return feats


def real_batches(tok, n_train: int = TRAIN_BATCH, n_val: int = VAL_BATCH, max_length: int = MAX_LEN):
    """The first SciQ training and dev examples, tokenized: the batches of (a) and (b)."""
    task = load_task("sciq")
    return (
        features(tok, task.train[:n_train], max_length=max_length),
        features(tok, task.dev[:n_val], max_length=max_length),
    )


def plain_steps(model, opt: torch.optim.Optimizer, batches, pad: int) -> None:
    """One plain LoRA step (mean of per-sample losses) of ``opt`` per batch of features."""
    for feats in batches:
        forward_losses(model, collate(feats, pad))[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def train_plain(model, feats, steps: int, lr: float, seed: int, run_dir: Path, pad: int) -> None:
    train_multitask(
        model,
        feats,
        MultitaskConfig(batch_size=TRAIN_BATCH, seed=seed),
        EngineConfig(max_steps=steps, lr=lr, device="cpu", seed=seed, progress=False),
        run_dir,
        pad,
    )


def train_rw(
    model, feats, val_feats, steps: int, lr: float, seed: int, run_dir: Path, pad: int, **config
) -> None:
    """META-LoRA reweighting; ``config``: the ``reweight:`` section (nested keys) beyond batch and seed."""
    cfg = ReweightConfig.from_dict({"batch_size": TRAIN_BATCH, "seed": seed, **config})
    train_reweight(
        model,
        feats,
        val_feats,
        cfg,
        EngineConfig(max_steps=steps, lr=lr, device="cpu", seed=seed, progress=False),
        run_dir,
        pad,
    )


def accuracy(model, tok, task: Task) -> float:
    """The library's held-out score of ``task``'s test split (zero-shot; ``acc``, or ``acc_norm`` for cloze
    answers), leaving the model in the mode it was in."""
    training = model.training
    scores = evaluate_tasks(model, tok, [task], split="test", shots=0, progress=False)[task.name]
    model.train(training)
    return float(scores[scores["primary"]])


def corrupt(examples, fraction: float, seed: int, style: str = "letter_text"):
    """Replace the answer of ``fraction`` of the examples by a random wrong option; returns (examples, is_corrupt)."""
    rng = random.Random(seed)
    bad = set(rng.sample(range(len(examples)), int(round(fraction * len(examples)))))
    out = []
    for i, ex in enumerate(examples):
        if i in bad:
            wrong = rng.choice([j for j in range(len(ex.options)) if j != ex.answer])
            ex = replace(ex, response=format_mc_response(ex.options, wrong, style), answer=wrong)
        out.append(ex)
    return out, [i in bad for i in range(len(examples))]


def warm_start(model, tok, task: Task, n_train: int, steps: int, lr: float, seed: int) -> float:
    """Train ``model``'s adapter in place (plain LoRA, ``steps`` steps at ``lr``) on clean training examples
    disjoint from the first ``n_train`` (the noisy ones); its held-out accuracy. One function for (c) and
    the probe, so at one seed both start from the same recipe."""
    clean: list[Example] = task.train[n_train : n_train + steps * TRAIN_BATCH]
    with tempfile.TemporaryDirectory() as d:
        feats = features(tok, clean, max_length=TRAIN_MAX_LEN)
        train_plain(model, feats, steps, lr, seed, Path(d), tok.pad_token_id)
    acc = accuracy(model, tok, task)
    print({"seed": seed, "warm_start_acc": acc, "clean_examples": len(clean)}, flush=True)
    return acc


# --- options and results ----------------------------------------------------------------------------------


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The options several experiments read (their names and defaults as ``benchmarks/reweight.py`` had them)."""
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--mc-style", default="letter_text", choices=STYLES, help="(c), probe: answer format")
    parser.add_argument(
        "--c-task", default="sciq", help="(c), probe: the built-in multiple-choice task to corrupt"
    )
    parser.add_argument("--c-warm-steps", type=int, default=0, help="(c), probe: clean warm-start steps")
    parser.add_argument("--c-warm-lr", type=float, default=5e-4, help="(c), probe: warm-start learning rate")
    parser.add_argument(
        "--results", type=Path, default=RESULTS_FILE, help="the JSON file the results are merged into"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="embedded name or HF path (default smollm2-135m); (c) and probe keys get it",
    )


def apply_model(args: argparse.Namespace) -> None:
    """``--model``: the model of this process and of the fresh processes it starts."""
    if args.model:
        os.environ[MODEL_ENV] = args.model


def seeds(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in args.seeds.split(",")]


def model_suffix(model: str | None) -> str:
    """``""`` for the default model, else ``_<model>`` with ``/`` and ``-`` as ``_`` (``_gemma3_270m``)."""
    if model is None or model == DEFAULT_MODEL:
        return ""
    return "_" + model.replace("/", "_").replace("-", "_")


def save_results(results: Mapping[str, Any], path: Path | None = None) -> Path:
    """Merge ``results`` into ``path`` (default ``results/reweight.json``; experiments may run as separate
    processes, each adding its keys)."""
    path = path or RESULTS_FILE
    previous = json.loads(path.read_text()) if path.exists() else {}
    merged = {**previous, "machine": machine(), **results}
    if path == RESULTS_FILE:
        save("reweight", merged)
    else:
        path.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def plain_step_fn(model, train_feats, pad: int, val_feats=None):
    """A plain LoRA step (mean of per-sample losses; with ``val_feats`` also a forward/backward of V: the floor)."""
    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-6)
    batch = collate(train_feats, pad)
    vbatch = collate(val_feats, pad) if val_feats else None

    def step() -> None:
        if vbatch is not None:
            losses, _ = forward_losses(model, vbatch)
            torch.autograd.grad(losses.sum(), params)
        losses, _ = forward_losses(model, batch)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def reweight_step_fn(model, train_feats, val_feats, pad: int, **config):
    """One reweighting step as the engine's ``Reweighter`` takes it (options resolved once, then steps 1–4)."""
    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-6)
    reweighting = Reweighting(model, ReweightConfig.from_dict(config))
    batch, vbatch = collate(train_feats, pad), collate(val_feats, pad)

    def step() -> None:
        val = reweighting.validation_stats(vbatch, len(val_feats))
        reweighting.gradient(batch, val, len(train_feats))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def experiment_main(description: str, add_arguments, run) -> None:
    """The command line of one experiment file: the shared options, its own, then ``run(args)`` saved."""
    parser = argparse.ArgumentParser(description=description)
    add_shared_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args()
    apply_model(args)
    save_results(run(args), args.results)
