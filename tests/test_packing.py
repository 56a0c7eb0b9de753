"""Padding-free packing (``multitask.packing``) against hand-built rows and a per-sample reference loop.

Oracles: ``collate_packed``'s positions, labels and segments by hand; per-sample losses of a packed row equal
each sample run alone (float64); the LoRA-MT gradient of a packed step equals the sum of per-sample
gradients, each sample forwarded alone with no padding (float64, 1e-10), for every adapter that packing
allows; whole packed runs equal unpacked ones; task-routed adapters are refused.
"""

from __future__ import annotations

import pytest
import torch
from test_train_engine import mixed_features, run_mt
from test_train_utils import PAD, adapter_state, max_abs_diff

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import collate, collate_packed
from metalora.testing import tiny_model
from metalora.train import EngineConfig, MultitaskConfig
from metalora.train.engine import Engine
from metalora.train.loss import count_label_tokens, token_loss_rows, token_loss_segments
from metalora.train.multitask import MultitaskConfigError, multitask_step

torch.set_num_threads(1)


def test_collate_packed_by_hand():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1, "sample_id": "a"},
        {"input_ids": [8, 9], "labels": [8, 9], "task_id": 0, "sample_id": "b"},
    ]
    packed = collate_packed(feats)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # each sample's first label is -100: position 2 (sample a's last) must not predict sample b's first token
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert packed["segment_ids"].tolist() == [0, 0, 0, 1, 1]
    assert packed["task_ids"].tolist() == [1, 0] and packed["sample_ids"] == ["a", "b"]
    assert "attention_mask" not in packed
    # the label tokens the loss covers are the samples' own: 2 of a, 1 of b
    assert count_label_tokens(feats) == 3


def test_packed_losses_equal_each_sample_alone():
    model = tiny_model(dtype=torch.float64)
    feats = mixed_features()[:5]
    packed = collate_packed(feats)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    sums, counts = token_loss_segments(logits, packed["labels"], packed["segment_ids"], len(feats))
    for i, f in enumerate(feats):
        alone = collate([f], PAD)
        s, c = token_loss_rows(model(input_ids=alone["input_ids"]).logits, alone["labels"])
        assert abs(float((sums[i] - s[0]).detach())) < 1e-12 and int(counts[i]) == int(c[0])


def _per_sample_reference(model, feats) -> dict[str, torch.Tensor]:
    """∇ (Σ_i Σ_t ℓ_it) / N_B, one sample at a time, each forwarded alone with no padding."""
    params = adapter_parameters(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    n_tokens = count_label_tokens(feats)
    for f in feats:
        alone = collate([f], PAD)
        s, _ = token_loss_rows(model(input_ids=alone["input_ids"]).logits, alone["labels"])
        grads = torch.autograd.grad((s.sum() / n_tokens), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                total[n] += g
    return total


@pytest.mark.parametrize(
    "adapter",
    [
        ml.LoRAConfig(r=4),
        ml.LoRAConfig(r=4, use_dora=True),
        ml.HydraLoRAConfig(r=4, num_heads=3),
        ml.MultiLoRAConfig(r=4, num_parallel=2),
    ],
    ids=["lora", "dora", "hydra_lora", "multilora"],
)
def test_packed_step_gradient_equals_the_per_sample_loop(tmp_path, adapter):
    model = ml.add_adapter(tiny_model(dtype=torch.float64), adapter, seed=3)
    with torch.no_grad():  # B ≠ 0, so every adapter tensor has a gradient
        for p in adapter_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    feats = mixed_features()[:7]
    expected = _per_sample_reference(model, feats)
    engine = Engine(model, EngineConfig(max_steps=1, progress=False), tmp_path)
    engine.zero_grad()
    multitask_step(engine, feats, MultitaskConfig(batch_size=7, micro_batch_size=3, packing=True), PAD)
    got = engine.grads()
    assert max(float((got[n] - expected[n]).abs().max()) for n in expected) < 1e-10
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-4  # the oracle is not all zeros


def test_packed_runs_equal_padded_runs_and_sample_reduction_counts_samples(tmp_path):
    lora = ml.LoRAConfig(r=4)
    padded, _ = run_mt(
        tmp_path / "a",
        MultitaskConfig(batch_size=6, micro_batch_size=2),
        model_config=lora,
        dtype=torch.float64,
    )
    packed, counters = run_mt(
        tmp_path / "b",
        MultitaskConfig(batch_size=6, micro_batch_size=2, packing=True),
        model_config=lora,
        dtype=torch.float64,
    )
    assert max_abs_diff(adapter_state(padded), adapter_state(packed)) < 1e-10
    assert counters.optimizer_steps == 4
    # reduction="sample": the default normalizer is the number of samples, packed or not
    model = ml.add_adapter(tiny_model(dtype=torch.float64), lora, seed=0)
    engine = Engine(model, EngineConfig(max_steps=1, progress=False), tmp_path / "c")
    feats = mixed_features()[:5]
    by_rows = engine.backward([collate(feats, PAD)], reduction="sample")
    by_segments = engine.backward([collate_packed(feats)], reduction="sample")
    assert abs(by_rows - by_segments) < 1e-12


def test_packing_refuses_task_routed_adapters(tmp_path):
    with pytest.raises(MultitaskConfigError, match="task-routed"):
        run_mt(tmp_path, MultitaskConfig(batch_size=6, packing=True))  # run_mt's default: MTL-LoRA
