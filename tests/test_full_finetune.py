"""Full fine-tuning (``adapter: {type: none}``) through the engine and the run: one LoRA-MT step against a
hand-written AdamW step (float64), kill and resume, save/load with tied embeddings, fp32 parameters, runs
of every algorithm that allows it, and the exported model read back by ``AutoModelForCausalLM``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train_run import _recipe
from test_train_utils import PAD, make_pools
from transformers import AutoModelForCausalLM

import metalora as ml
from metalora.adapters import AdapterConfigError, NotMergeableError, adapter_parameters
from metalora.cli import main
from metalora.testing import tiny_llama
from metalora.train import EngineConfig, MultitaskConfig, checkpoint, train_multitask
from metalora.train.multitask import EpochBatches
from metalora.train.runner import RunConfigError, resolve_config, run

IDS = torch.tensor([[1, 5, 9, 13, 7, 22], [3, 8, 2, 40, 11, 6]])


def full_ft(dtype: torch.dtype = torch.float64, **overrides) -> torch.nn.Module:
    return ml.add_adapter(tiny_llama(dtype=dtype, **overrides), ml.FullFinetuneConfig())


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def features() -> list[dict]:
    return sum(make_pools(n_tasks=2, per_task=4, length=10).values(), [])


def hand_adamw(model: torch.nn.Module, feats: list[dict], lr: float, wd: float, betas, eps: float) -> None:
    """One AdamW step (step 1: m̂ = g, v̂ = g²) on the mean-token next-token loss, written out."""
    ids = torch.tensor([f["input_ids"] for f in feats])
    labels = torch.tensor([f["labels"] for f in feats])
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    loss = F.cross_entropy(logits[keep], target[keep], reduction="sum") / keep.sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    b1, b2 = betas
    with torch.no_grad():
        for p, g in zip(params.values(), grads, strict=True):
            m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
            p.mul_(1 - lr * wd).sub_(lr * m_hat / (v_hat.sqrt() + eps))


def test_every_parameter_trains_and_a_lora_mt_step_is_hand_written_adamw(tmp_path):
    model = full_ft()
    reference = copy.deepcopy(model)
    assert adapter_parameters(model).keys() == dict(model.named_parameters()).keys()
    assert all(p.requires_grad for p in model.parameters())
    feats = features()  # one batch holds them all, so the shuffle does not change the loss
    cfg = EngineConfig(max_steps=1, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, progress=False)
    train_multitask(model, feats, MultitaskConfig(batch_size=len(feats)), cfg, tmp_path, PAD)
    hand_adamw(reference, feats, 1e-2, 0.1, (0.8, 0.95), 1e-6)
    got, want = state(model), state(reference)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-12
    before = state(full_ft())
    assert all(not torch.equal(got[k], before[k]) for k in got)  # weight decay moves every tensor


def test_half_precision_base_trains_in_fp32():
    model = full_ft(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in full_ft(torch.float64).parameters()} == {torch.float64}


def _train(path, model, steps=6, kill_at=None):
    original = EpochBatches.sample
    calls = {"n": 0}

    def dying(self):
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return original(self)

    EpochBatches.sample = dying
    try:
        cfg = EngineConfig(max_steps=steps, lr=1e-2, progress=False, checkpoint_every=2)
        train_multitask(model, features(), MultitaskConfig(batch_size=3), cfg, path, PAD)
    finally:
        EpochBatches.sample = original
    return model


def test_killed_and_resumed_run_ends_with_the_same_weights_tied_embeddings(tmp_path):
    tied = {"dtype": torch.float32, "tie_word_embeddings": True}
    full = _train(tmp_path / "full", full_ft(**tied))
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", full_ft(**tied), kill_at=3)
    latest = checkpoint.latest(tmp_path / "cut/checkpoints")
    assert latest.name == "step-00000002"
    # the checkpoint holds the whole model's weights, the tied tensor once
    saved = load_file(str(latest / checkpoint.ADAPTER_FILE))
    assert saved.keys() == dict(full.named_parameters()).keys() and "lm_head.weight" not in saved
    resumed = _train(tmp_path / "cut", full_ft(**tied))
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
    got, want = state(resumed), state(full)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_save_load_round_trip_and_merge_is_the_identity(tmp_path):
    model = full_ft(tie_word_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ml.save_adapter(model, tmp_path / "a")
    loaded = ml.load_adapter(tiny_llama(dtype=torch.float64, tie_word_embeddings=True), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(state(model).values(), state(loaded).values(), strict=True))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    merged = ml.merge(loaded)
    with torch.no_grad():
        assert torch.equal(merged(IDS).logits, model(IDS).logits)
    assert not hasattr(merged, "_metalora_adapter")
    with pytest.raises(NotMergeableError, match="--merge"):
        ml.export_peft(model, tmp_path / "peft")


def test_recipes_none_type_resolves_and_reweight_is_refused(tmp_path):
    recipe = _recipe(tmp_path, "lora_mt")
    recipe["adapter"] = {"type": "none"}
    assert resolve_config(recipe)["adapter"] == {"type": "none"}
    with pytest.raises(AdapterConfigError, match="takes no fields"):
        resolve_config({**recipe, "adapter": {"type": "none", "r": 4}})
    bad = {
        **recipe,
        "algorithm": "reweight",
        "data": {**recipe["data"], "val_task": recipe["data"]["tasks"][0]},
    }
    with pytest.raises(RunConfigError, match="full fine-tuning"):
        resolve_config(bad)


@pytest.mark.parametrize("algorithm", ["lora_mt", "meta", "lora_st"])
def test_runs_train_the_whole_model_and_export_it(tmp_path, algorithm):
    recipe = _recipe(tmp_path, algorithm)
    recipe["adapter"] = {"type": "none"}
    recipe["train"]["lr"] = 1e-3
    run_dir = run(recipe)
    out = run_dir / "tasks" / "task1" if algorithm == "lora_st" else run_dir
    base = ml.load_base(tmp_path / "base")[0]
    trained = ml.load_adapter(ml.load_base(tmp_path / "base")[0], out / "adapter")
    weights = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert weights.keys() == dict(base.named_parameters()).keys()
    args = ["export", str(run_dir), "--merge", str(tmp_path / "merged")]
    assert main(args + (["--task", "task1"] if algorithm == "lora_st" else [])) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = trained.eval()(IDS).logits
        assert torch.equal(exported(IDS).logits, want)
        assert not math.isclose(float((want - base(IDS).logits).abs().max()), 0.0)
