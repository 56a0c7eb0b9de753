"""The engine and LoRA-MT/ST against oracles: schedules, accumulation, resume, NaN guard, counters, precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_train_utils import PAD, adapter_state, make_pools, max_abs_diff

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.testing import tiny_model
from metalora.train import (
    EngineConfig,
    MultitaskConfig,
    NonFiniteLossError,
    checkpoint,
    train_multitask,
    train_single_task,
)
from metalora.train.engine import lr_multiplier
from metalora.train.multitask import EpochBatches, few_shot_epochs, steps_for_epochs


def mixed_features(length: int = 10, vary: bool = True) -> list[dict]:
    return sum(make_pools(n_tasks=3, per_task=8, length=length, vary=vary).values(), [])


def run_mt(path, config=None, steps=4, model_config=None, dtype=torch.float32, **engine):
    model = ml.add_adapter(tiny_model(dtype=dtype), model_config or ml.MTLLoRAConfig(r=4, num_tasks=3))
    counters = train_multitask(
        model,
        mixed_features(),
        config or MultitaskConfig(batch_size=6),
        EngineConfig(max_steps=steps, lr=1e-2, progress=False, **engine),
        path,
        PAD,
    )
    return model, counters


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_matches_closed_form(schedule):
    cfg = EngineConfig(max_steps=10, lr=1.0, schedule=schedule, warmup_steps=2, min_lr_ratio=0.1)
    f = lr_multiplier(cfg)
    assert [f(0), f(1)] == [0.5, 1.0]
    for s in range(2, 10):
        p = (s - 2) / 8
        expected = {
            "constant": 1.0,
            "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)),
            "linear": 0.1 + 0.9 * (1 - p),
        }
        assert f(s) == pytest.approx(expected[schedule], abs=1e-12)


def test_checkpoint_packing_round_trips_optimizer_and_rng_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.ones_like(p)
    opt.step()
    state = {"opt": opt.state_dict(), "rng": checkpoint.rng_state(), "t": (1, "a", [2.5, None])}
    tensors: dict = {}
    back = checkpoint.unpack(json.loads(json.dumps(checkpoint.pack(state, tensors, "x"))), tensors)
    assert back["t"] == (1, "a", [2.5, None])
    assert back["opt"]["param_groups"] == opt.state_dict()["param_groups"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(back["opt"]["state"][0][key], opt.state_dict()["state"][0][key])
    np_state = back["rng"]["numpy"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], np.random.get_state()[1])
    assert torch.equal(back["rng"]["torch"], torch.get_rng_state())


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    # variable lengths: each micro-batch's loss is normalized by the global label-token count (float64,
    # since micro-batches pad to other lengths and Adam amplifies float32 rounding of tiny gradients)
    full, _ = run_mt(tmp_path / "a", MultitaskConfig(batch_size=6), dtype=torch.float64)
    accum, _ = run_mt(tmp_path / "b", MultitaskConfig(batch_size=6, micro_batch_size=2), dtype=torch.float64)
    assert max_abs_diff(adapter_state(full), adapter_state(accum)) < 1e-10
    assert (
        max_abs_diff(
            adapter_state(full),
            adapter_state(ml.add_adapter(tiny_model(), ml.MTLLoRAConfig(r=4, num_tasks=3))),
        )
        > 1e-4
    )


def test_only_adapter_parameters_change(tmp_path):
    model = ml.add_adapter(tiny_model(), ml.MoELoRAConfig(r=4, num_tasks=3, num_experts=2))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_parameters(model)}
    before = adapter_state(model)
    train_multitask(
        model,
        mixed_features(),
        MultitaskConfig(batch_size=6),
        EngineConfig(max_steps=3, lr=1e-2, progress=False),
        tmp_path,
        PAD,
    )
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert max_abs_diff(adapter_state(model), before) > 0


def test_few_shot_protocol_steps_and_counters_are_exact(tmp_path):
    assert (few_shot_epochs(50), few_shot_epochs(100)) == (5, 10)
    features = sum(make_pools(n_tasks=2, per_task=50, length=6).values(), [])
    epochs = few_shot_epochs(50)
    model = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=2))
    counters = train_multitask(
        model,
        features,
        MultitaskConfig(batch_size=40, epochs=epochs),
        EngineConfig(max_steps=1, lr=1e-3, progress=False),
        tmp_path,
        PAD,
    )
    steps = math.ceil(5 * 100 / 40)
    assert steps == steps_for_epochs(100, 40, 5) == 13
    assert (counters.optimizer_steps, counters.samples, counters.tokens) == (13, 13 * 40, 13 * 40 * 6)
    saved = json.loads((tmp_path / "counters.json").read_text())
    assert saved["status"] == "completed" and saved["samples"] == 520 and saved["peak_memory_bytes"] > 0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 14))
    assert [r["samples"] for r in records] == [40 * s for s in range(1, 14)]


def test_epoch_batches_visit_every_example_once_per_epoch_and_resume():
    items = [{"i": i} for i in range(10)]
    b = EpochBatches(items, 4, seed=3)
    first = [x["i"] for _ in range(5) for x in b.sample()]  # 20 = two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    b2 = EpochBatches(items, 4, seed=3)
    b2.sample(), b2.sample()
    c = EpochBatches(items, 4, seed=3)
    c.load_state_dict(json.loads(json.dumps(b2.state_dict())))
    assert [x["i"] for _ in range(3) for x in c.sample()] == first[8:]


def test_killed_and_resumed_run_ends_with_the_same_adapter(tmp_path):
    full, full_counters = run_mt(tmp_path / "full", steps=6, checkpoint_every=2)
    model = ml.add_adapter(tiny_model(), ml.MTLLoRAConfig(r=4, num_tasks=3))

    original = EpochBatches.sample
    calls = {"n": 0}

    def dying(self):
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return original(self)

    EpochBatches.sample = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train_multitask(
                model,
                mixed_features(),
                MultitaskConfig(batch_size=6),
                EngineConfig(max_steps=6, lr=1e-2, progress=False, checkpoint_every=2),
                tmp_path / "cut",
                PAD,
            )
    finally:
        EpochBatches.sample = original
    assert checkpoint.latest(tmp_path / "cut/checkpoints").name == "step-00000002"
    resumed, counters = run_mt(tmp_path / "cut", steps=6, checkpoint_every=2)
    assert max_abs_diff(adapter_state(resumed), adapter_state(full)) == 0.0
    assert (counters.optimizer_steps, counters.samples, counters.tokens) == (
        full_counters.optimizer_steps,
        full_counters.samples,
        full_counters.tokens,
    )


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good, _ = run_mt(tmp_path / "good", steps=2)  # oracle: the adapter after 2 clean steps

    class Poison:
        """After 3 clean batches, poison an adapter tensor (a divergence) before step 4's forward."""

        def __init__(self, model):
            self.model, self.calls = model, 0

        def __call__(self, batches_self):
            self.calls += 1
            if self.calls == 4:
                with torch.no_grad():
                    next(iter(adapter_parameters(self.model).values())).fill_(float("inf"))
            return original(batches_self)

    model = ml.add_adapter(tiny_model(), ml.MTLLoRAConfig(r=4, num_tasks=3))
    original = EpochBatches.sample
    EpochBatches.sample = lambda self: poison(self)
    poison = Poison(model)
    try:
        with pytest.raises(NonFiniteLossError, match="at step 4") as err:
            train_multitask(
                model,
                mixed_features(),
                MultitaskConfig(batch_size=6),
                EngineConfig(max_steps=6, lr=1e-2, progress=False, checkpoint_every=2),
                tmp_path / "nan",
                PAD,
            )
    finally:
        EpochBatches.sample = original
    assert "step-00000002" in str(err.value)
    last = checkpoint.latest(tmp_path / "nan/checkpoints")
    assert last.name == "step-00000002"
    saved, state, _ = checkpoint.load(last)
    assert max_abs_diff(saved, adapter_state(good)) == 0.0
    assert state["counters"]["optimizer_steps"] == 2
    assert not (tmp_path / "nan/adapter").exists()
    status = json.loads((tmp_path / "nan/counters.json").read_text())
    assert status["status"].startswith("stopped") and status["optimizer_steps"] == 3


def test_bf16_autocast_tracks_fp32(tmp_path):
    fp32, c32 = run_mt(tmp_path / "fp32", steps=2)
    bf16, c16 = run_mt(tmp_path / "bf16", steps=2, precision="bf16")
    l32 = [json.loads(x)["loss"] for x in (tmp_path / "fp32/metrics.jsonl").read_text().splitlines()]
    l16 = [json.loads(x)["loss"] for x in (tmp_path / "bf16/metrics.jsonl").read_text().splitlines()]
    assert l16 != l32 and max(abs(a - b) for a, b in zip(l16, l32, strict=True)) < 0.05
    assert all(p.dtype == torch.float32 for p in adapter_parameters(bf16).values())


def test_lora_st_trains_one_adapter_per_task(tmp_path):
    pools = make_pools(n_tasks=2, per_task=6, length=8)
    results = train_single_task(
        lambda task: ml.add_adapter(tiny_model(), ml.LoRAConfig(r=2)),
        pools,
        MultitaskConfig(batch_size=3),
        EngineConfig(max_steps=2, lr=1e-2, progress=False),
        tmp_path,
        PAD,
    )
    assert sorted(results) == ["t0", "t1"] and all(c.samples == 6 for c in results.values())
    a = ml.load_adapter(tiny_model(), tmp_path / "tasks/t0/adapter")
    b = ml.load_adapter(tiny_model(), tmp_path / "tasks/t1/adapter")
    assert max_abs_diff(adapter_state(a), adapter_state(b)) > 0
    # oracle: LoRA-ST on t0 is LoRA-MT on t0's features alone
    alone = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=2))
    train_multitask(
        alone,
        pools["t0"],
        MultitaskConfig(batch_size=3),
        EngineConfig(max_steps=2, lr=1e-2, progress=False),
        tmp_path / "alone",
        PAD,
    )
    assert max_abs_diff(adapter_state(a), adapter_state(alone)) == 0.0


def test_lora_mt_logs_per_task_losses_against_a_per_sample_loop(tmp_path):
    """``loss/<task>`` of a mixed batch = Σ token losses of that task's rows / their label tokens, computed
    here one sample at a time in float64 with the adapter as it was before the step."""
    from metalora.train.multitask import EpochBatches

    features = mixed_features()
    config = MultitaskConfig(batch_size=6, micro_batch_size=4)  # 2 micro-batches of mixed tasks
    model = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=4))
    randomize = adapter_parameters(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in randomize.values():
            p.add_(torch.randn_like(p) * 0.1)
    reference = tiny_model(dtype=torch.float64)
    ml.add_adapter(reference, ml.LoRAConfig(r=4))
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    batch = EpochBatches(features, 6, seed=0).sample()  # the engine draws the same first batch
    sums: dict[int, list[float]] = {}
    for f in batch:
        ids = torch.tensor([f["input_ids"]])
        labels = torch.tensor([f["labels"]])
        with torch.no_grad():
            logp = torch.log_softmax(reference(ids).logits[0], dim=-1)
        acc = sums.setdefault(f["task_id"], [0.0, 0.0])
        for t in range(ids.shape[1] - 1):
            if labels[0, t + 1] != -100:
                acc[0] -= float(logp[t, labels[0, t + 1]])
                acc[1] += 1
    names = ["alpha", "beta", "gamma"]
    train_multitask(
        model,
        features,
        config,
        EngineConfig(max_steps=1, lr=1e-2, progress=False),
        tmp_path,
        PAD,
        task_names=names,
    )
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    expected = {f"loss/{names[t]}": s / n for t, (s, n) in sums.items()}
    assert {k: v for k, v in logged.items() if k.startswith("loss/")} == pytest.approx(expected, rel=1e-5)
    total = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
    assert logged["loss"] == pytest.approx(total, rel=1e-5)
