"""Gradient checkpointing (``train.gradient_checkpointing``) against the same step without it.

Oracle: the step without checkpointing on an identical model. For every algorithm (LoRA-MT on a mixed-task
batch, LoRA-ST on one task's batch, MeTA-LoRA's inner SGD steps and query gradients, reweighting's weights,
scores and update) and every adapter type (PEFT LoRA with and without dropout, DoRA, MTL-LoRA and MoELoRA
routed per sample, HydraLoRA, MultiLoRA, R-LoRA with its per-head dropout, full fine-tuning) the gradients
agree to 1e-10 in float64. Dropout draws the same masks in the recompute because torch's checkpoint
restores the RNG state; each side starts from the same seed. Each comparison also checks that the
recompute ran (a decoder layer's forward ran more often with checkpointing). Then whole runs (tiny Llama,
fp32, 3 steps): a recipe with ``train.gradient_checkpointing=true`` ends with the very adapter (bitwise)
the run without it ends with, for LoRA-MT, LoRA-ST, MeTA-LoRA (MTL-LoRA, routed) and reweighting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_train_run import _recipe
from test_train_utils import PAD, make_features, make_pools
from torch import nn

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import collate
from metalora.testing import randomize_adapter, tiny_model
from metalora.train import Engine, EngineConfig, MetaConfig, MultitaskConfig, run
from metalora.train.config import RunConfig, RunConfigError
from metalora.train.engine import EngineConfigError, enable_gradient_checkpointing
from metalora.train.meta import build_sampler, meta_step
from metalora.train.multitask import multitask_step
from metalora.train.reweight import ReweightConfig, ReweightConfigError, Reweighting

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2 is float64 end to end (Llama's RMSNorm runs in fp32)
ATOL = 1e-10
ADAPTERS: dict[str, Callable[[], Any]] = {
    "lora": lambda: ml.LoRAConfig(r=4, target_modules=GPT2_TARGETS),
    "lora_dropout": lambda: ml.LoRAConfig(r=4, dropout=0.3, target_modules=GPT2_TARGETS),
    "dora": lambda: ml.LoRAConfig(r=4, use_dora=True, target_modules=GPT2_TARGETS),
    "mtl_lora": lambda: ml.MTLLoRAConfig(r=4, num_tasks=3, num_up=2, target_modules=GPT2_TARGETS),
    "moelora": lambda: ml.MoELoRAConfig(
        r=4, num_tasks=3, num_experts=2, task_embedding_dim=8, target_modules=GPT2_TARGETS
    ),
    "hydra_lora": lambda: ml.HydraLoRAConfig(r=4, num_heads=2, target_modules=GPT2_TARGETS),
    "multilora": lambda: ml.MultiLoRAConfig(r=4, num_parallel=2, target_modules=GPT2_TARGETS),
    "r_lora": lambda: ml.RLoRAConfig(r=4, num_heads=2, head_dropout=0.3, target_modules=GPT2_TARGETS),
    "none": ml.FullFinetuneConfig,
}
LOW_RANK = [name for name in ADAPTERS if name != "none"]  # reweighting needs rank-r bottlenecks


def f64_model(adapter: str, checkpointing: bool) -> nn.Module:
    """Tiny GPT-2 in float64 with ``adapter`` (random adapter tensors, so no gradient vanishes at B = 0)."""
    model = ml.add_adapter(tiny_model("gpt2", dtype=torch.float64), ADAPTERS[adapter](), seed=0)
    if adapter != "none":
        randomize_adapter(model, scale=0.3)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def mixed_batch(n_per_task: int = 2) -> list[dict]:
    """Samples of tasks 0, 1, 2 interleaved, of different lengths (padding and routing both matter)."""
    per_task = [make_features(f"t{t}", t, n_per_task, length=10, seed=10 + t, vary=True) for t in range(3)]
    return [f for group in zip(*per_task, strict=True) for f in group]


# --- one step of each algorithm -------------------------------------------------------------------------

Step = Callable[[nn.Module, Path], dict[str, torch.Tensor]]


def _engine(model: nn.Module, run_dir: Path) -> Engine:
    return Engine(model, EngineConfig(device="cpu", progress=False), run_dir)


def lora_mt_step(model: nn.Module, run_dir: Path) -> dict[str, torch.Tensor]:
    """LoRA-MT: a mixed-task batch in micro-batches (task-routed adapters route every sample)."""
    engine = _engine(model, run_dir)
    batch = mixed_batch()
    out = multitask_step(engine, batch, MultitaskConfig(batch_size=len(batch), micro_batch_size=4), PAD)
    return {**engine.grads(), "loss": torch.tensor(out.loss)}


def lora_st_step(model: nn.Module, run_dir: Path) -> dict[str, torch.Tensor]:
    """LoRA-ST: a batch of one task."""
    engine = _engine(model, run_dir)
    batch = make_features("t1", 1, 4, length=10, seed=3, vary=True)
    out = multitask_step(engine, batch, MultitaskConfig(batch_size=len(batch)), PAD)
    return {**engine.grads(), "loss": torch.tensor(out.loss)}


def meta_iteration(model: nn.Module, run_dir: Path) -> dict[str, torch.Tensor]:
    """MeTA-LoRA: per task, k = 2 inner SGD steps on S, then ∇L_Q at θ_i; θ restored; (1/n) Σ g_i."""
    engine = _engine(model, run_dir)
    cfg = MetaConfig(n_tasks=2, inner_steps=2, support_size=3, query_size=3, inner_lr=0.05)
    episodes = build_sampler(make_pools(length=10, vary=True), cfg, {"t0": 0, "t1": 1, "t2": 2}).sample()
    out = meta_step(engine, episodes, cfg, PAD)
    theta = {f"theta/{n}": p.detach().clone() for n, p in engine.params.items()}  # restored θ
    return {**engine.grads(), **theta, "loss": torch.tensor(out.loss)}


def reweight_step(config: dict[str, Any]) -> Step:
    """Reweighting: validation statistics, then the training batch's scores, weights and update."""

    def step(model: nn.Module, run_dir: Path) -> dict[str, torch.Tensor]:
        rw = Reweighting(model, ReweightConfig.from_dict({"batch_size": 6, **config}))
        val = make_features("va", 1, 3, length=10, seed=2, vary=True)
        stats = rw.validation_stats(collate(val, PAD), len(val))
        train = mixed_batch()
        result = rw.gradient(collate(train, PAD), stats, len(train))
        assert result.case == "eq8" and float(result.weights.max()) > 0
        grads = {n: p.grad.detach().clone() for n, p in adapter_parameters(model).items()}
        return {**grads, "weights": result.weights, "scores": result.scores, "losses": result.losses}

    return step


def compare(adapter: str, step: Step, tmp_path: Path) -> None:
    """``step`` on two identical models, without and with checkpointing, from the same RNG state."""
    results, calls = [], [0, 0]
    for side, checkpointing in enumerate((False, True)):
        model = f64_model(adapter, checkpointing)

        def count(*_: Any, side: int = side) -> None:
            calls[side] += 1

        model.transformer.h[0].ln_1.register_forward_hook(count)
        torch.manual_seed(7)
        results.append(step(model, tmp_path / f"ckpt{int(checkpointing)}"))
    plain, ckpt = results
    assert calls[1] > calls[0], "the checkpointed step ran no recompute"
    assert plain.keys() == ckpt.keys()
    assert any(float(g.abs().max()) > 0 for n, g in plain.items() if "lora" in n or adapter == "none")
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("algorithm", ["lora_mt", "lora_st", "meta"])
def test_gradients_equal_those_without_checkpointing(tmp_path, algorithm, adapter):
    step = {"lora_mt": lora_mt_step, "lora_st": lora_st_step, "meta": meta_iteration}[algorithm]
    compare(adapter, step, tmp_path)


@pytest.mark.parametrize("adapter", LOW_RANK)
def test_reweighting_weights_and_update_equal_those_without_checkpointing(tmp_path, adapter):
    """Fused scheme for plain PEFT LoRA, two backward passes for the rest; routed adapters on a mixed batch."""
    compare(adapter, reweight_step({}), tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        {"scheme": "two_backward"},
        {"stats": {"similarity": "dense"}},
        {"stats": {"similarity": "exact"}},
        {"direction": {"score": "layer_cosine", "aggregation": "per_sample"}},
    ],
    ids=["two_backward", "dense", "exact", "layer_cosine"],
)
def test_reweighting_options_under_checkpointing(tmp_path, config):
    compare("lora", reweight_step(config), tmp_path)


def test_reentrant_checkpointing_is_refused_by_reweighting():
    """Reweighting's ``torch.autograd.grad`` is not allowed under reentrant checkpointing: a clear error."""
    model = f64_model("lora", checkpointing=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    rw = Reweighting(model, ReweightConfig.from_dict({"batch_size": 6}))
    val = collate(make_features("va", 0, 3, length=10, seed=2), PAD)
    with pytest.raises(ReweightConfigError, match="non-reentrant"):
        rw.validation_stats(val, 3)


def test_engine_enables_it_and_refuses_a_model_without_it(tmp_path):
    model = ml.add_adapter(tiny_model("gpt2"), ml.LoRAConfig(r=4, target_modules=GPT2_TARGETS))
    Engine(model, EngineConfig(device="cpu", progress=False), tmp_path / "off")
    assert not model.is_activation_checkpointing  # off by default
    Engine(model, EngineConfig(device="cpu", progress=False, gradient_checkpointing=True), tmp_path / "on")
    assert model.is_activation_checkpointing
    layer = model.transformer.h[0]
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    with pytest.raises(EngineConfigError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_recipe_key_is_typed():
    recipe = {"data": {"tasks": ["arc_easy"]}}
    assert RunConfig.load(recipe, ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True
    assert RunConfig.load(recipe).train.gradient_checkpointing is False
    with pytest.raises((RunConfigError, ValueError), match="gradient_checkpointing"):
        RunConfig.load(recipe, ["train.gradient_checkpointing=sometimes"])


# --- whole runs ------------------------------------------------------------------------------------------


def _run_recipe(tmp_path: Path, algorithm: str) -> dict[str, Any]:
    if algorithm != "reweight":
        return _recipe(tmp_path, algorithm)
    recipe = _recipe(tmp_path, "lora_mt")
    recipe.pop("multitask")
    recipe.update(algorithm="reweight", reweight={"batch_size": 10, "val_ratio": 10})
    recipe["data"]["val_task"] = recipe["data"]["tasks"][1]
    return recipe


def _adapters(run_dir: Path, algorithm: str) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if algorithm != "lora_st":
        return {"": load_file(run_dir / "adapter" / "adapter.safetensors")}
    return {d.name: load_file(d / "adapter" / "adapter.safetensors") for d in (run_dir / "tasks").iterdir()}


@pytest.mark.parametrize("algorithm", ["lora_mt", "lora_st", "meta", "reweight"])
def test_run_with_checkpointing_trains_the_same_adapter(tmp_path, algorithm):
    recipe = _run_recipe(tmp_path, algorithm)
    plain = run({**recipe, "name": "plain"})
    ckpt = run({**recipe, "name": "ckpt"}, overrides=["train.gradient_checkpointing=true"])
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["gradient_checkpointing"] is True
    a, b = _adapters(plain, algorithm), _adapters(ckpt, algorithm)
    assert a.keys() == b.keys() and a
    for task in a:
        assert a[task].keys() == b[task].keys()
        for name in a[task]:  # the recompute repeats the same CPU kernels on the same inputs: bitwise
            assert torch.equal(b[task][name], a[task][name]), name
    if algorithm == "reweight":
        rows = [(ckpt / "weights.jsonl").read_text(), (plain / "weights.jsonl").read_text()]
        weights = [[json.loads(line)["weights"] for line in r.splitlines()] for r in rows]
        assert weights[0] == weights[1]
