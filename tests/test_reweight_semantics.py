"""Reweighting as the paper has it (issue 16 items 1-3), against oracles:

* the ratio sizes the validation *set* (M = N / ratio, hand-computed), drawn with the run's seed,
  reproducibly, never from the test items;
* Eq. 8's two zero-sum cases: no signal (u ≡ 0) takes one unweighted step that equals a plain LoRA step
  with AdamW written out by hand; signal all against (every u ≤ 0) skips the optimizer step, leaving the
  adapter tensors and the AdamW state bit-identical to a copy taken before;
* the paper's §4.1 recipe and its CPU version run, with ``modules: all | attention | mlp``.

Shown to fail on planted bugs: with ``outer_step`` calling ``optimizer.step()`` on a skipped batch, the
adapter moves (AdamW's momentum) and the skip test fails (the ``zero`` control shows it); with the old
per-step ratio (|V| = batch // ratio) the run's validation sample counts differ from the oracle.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_train_run import _tasks, _tiny_base
from test_train_utils import PAD, make_features

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import Example, collate, load_task
from metalora.testing import randomize_adapter, tiny_model
from metalora.train import EngineConfig, lora_grads, run
from metalora.train.config import RunConfig, RunConfigError
from metalora.train.engine import Engine
from metalora.train.reweight import ReweightBatches, ReweightConfig, Reweighter
from metalora.train.reweight_config import ReweightConfigError
from metalora.train.reweight_data import draw_validation_set, held_out_keys, validation_set_size
from metalora.train.runner import _validation_features, load_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# --- 1. the ratio is a dataset ratio --------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, ratio, expected", [(1000, 5, 200), (1000, 10, 100), (1000, 50, 20), (60, 10, 6), (9, 10, 1)]
)
def test_validation_set_size_is_n_over_ratio(n, ratio, expected):
    assert validation_set_size(n, ratio) == expected
    assert validation_set_size(n, ratio, size=7) == 7  # data.val_examples gives M directly


def _examples(task: str, n: int) -> list[Example]:
    return [Example(prompt=f"q{i}", response=f"a{i}", task=task, id=str(i)) for i in range(n)]


def test_draw_is_seeded_nested_and_leaves_out_test_items():
    pool = _examples("t", 40)
    test = [pool[i] for i in range(0, 40, 4)]  # 10 items that must never be drawn
    exclude = held_out_keys(test)
    draws = {r: draw_validation_set(pool, 100, r, seed=3, exclude=exclude) for r in (5, 10, 50)}
    assert {r: len(d) for r, d in draws.items()} == {5: 20, 10: 10, 50: 2}
    assert all(not ({(e.task, e.id) for e in d} & exclude) for d in draws.values())
    assert draws[5] == draw_validation_set(pool, 100, 5, seed=3, exclude=exclude)  # reproducible
    assert draws[5] != draw_validation_set(pool, 100, 5, seed=4, exclude=exclude)
    assert draws[50] == draws[10][:2] and draws[10] == draws[5][:10]  # one seeded order, nested sets
    assert len({e.id for e in draws[5]}) == 20
    with pytest.raises(ReweightConfigError, match=r"M = 31 .* 30 outside the test items"):
        draw_validation_set(pool, 155, 5, seed=3, exclude=exclude)


def _recipe(tmp_path: Path, ratio: int, rows: int = 200) -> dict:
    if not (tmp_path / "base").is_dir():
        _tiny_base(tmp_path / "base")
    tasks = _tasks(tmp_path, rows_per_task=rows)  # 200 rows: 160 train, 20 dev, 20 test per task
    return {
        "name": f"ratio{ratio}",
        "output_dir": str(tmp_path / "runs"),
        "algorithm": "reweight",
        "model": str(tmp_path / "base"),
        "adapter": {"type": "lora", "r": 4},
        "data": {"tasks": tasks, "examples_per_task": 20, "max_length": 16, "val_task": tasks[1]},
        "reweight": {"batch_size": 4, "val_ratio": ratio, "seed": 5},
        "train": {"max_steps": 2, "lr": 1e-2, "progress": False},
    }


@pytest.mark.parametrize("ratio, m", [(5, 12), (10, 6), (50, 1)])
def test_runner_draws_m_equal_n_over_ratio_from_the_dev_split_not_the_test_split(tmp_path, ratio, m):
    cfg = RunConfig.load(_recipe(tmp_path, ratio))
    _, tokenizer = load_model(cfg)
    n = 3 * 20  # the training pool: 3 tasks x 20 examples
    val = _validation_features(cfg, tokenizer, {"task0": 0, "task1": 1, "task2": 2}, n)
    assert len(val) == m == n // ratio
    task = load_task(cfg.data.val_task, seed=cfg.data.seed)
    ids = [f["sample_id"] for f in val]
    assert set(ids) <= {e.id for e in task.dev} and not set(ids) & {e.id for e in task.test}
    again = _validation_features(cfg, tokenizer, {"task0": 0, "task1": 1, "task2": 2}, n)
    assert [f["sample_id"] for f in again] == ids  # the same seed draws the same set
    other = RunConfig.load(_recipe(tmp_path, ratio), ["reweight.seed=6"])
    if m < len(task.dev):
        assert [f["sample_id"] for f in _validation_features(other, tokenizer, {}, n)] != ids
    with pytest.raises(RunConfigError, match="disjoint from the test items"):
        _validation_features(
            RunConfig.load(_recipe(tmp_path, ratio), ["data.val_split=test"]), tokenizer, {}, n
        )


def test_ratios_5_10_50_are_different_runs(tmp_path):
    """Per step: 4 training samples and a validation batch of min(4, M) from a set of M = 60 // ratio."""
    samples = {}
    for ratio in (5, 10, 50):
        run_dir = run(_recipe(tmp_path, ratio))
        samples[ratio] = json.loads((run_dir / "counters.json").read_text())["samples"]
    assert samples == {5: 2 * (4 + 4), 10: 2 * (4 + 4), 50: 2 * (4 + 1)}
    weights = {r: (tmp_path / "runs" / f"ratio{r}" / "weights.jsonl").read_text() for r in (5, 10)}
    assert weights[5] != weights[10]  # different validation sets score the samples differently


# --- 2. Eq. 8's δ: no signal, and signal all against -----------------------------------------------------


def _reweighter(tmp_path: Path, model, config: ReweightConfig, schedule: str = "constant"):
    engine_config = EngineConfig(max_steps=8, lr=1e-2, device="cpu", progress=False, schedule=schedule)
    engine = Engine(model, engine_config, tmp_path)
    train = make_features("tr", 0, 16, seed=3, vary=True)
    val = make_features("va", 0, 8, seed=4, vary=True)
    return engine, Reweighter(engine, ReweightBatches(train, val, config), config, PAD)


def _step(engine: Engine, reweighter: Reweighter, step: int):
    engine.zero_grad()
    out = reweighter.step(step)
    engine.outer_step(out, step)
    return out


def _all_against(reweighter: Reweighter) -> None:
    """Every u < 0 (the scores' magnitudes kept): the second case of Eq. 8's zero sum."""
    scorer = reweighter.reweighting.scorer
    score = scorer.score
    scorer.score = lambda captured, val: -score(captured, val).abs() - 1e-6


@pytest.mark.parametrize("fallback", ["skip", "zero"])
def test_all_negative_u_skips_the_step_leaving_adapter_and_adamw_state_bit_identical(tmp_path, fallback):
    model = ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=4))
    randomize_adapter(model, scale=0.2)
    config = ReweightConfig.from_dict({"batch_size": 4, "weights": {"fallback": fallback}})
    engine, reweighter = _reweighter(tmp_path, model, config)
    for step in range(3):  # AdamW's moments are non-zero from here on
        _step(engine, reweighter, step)
    params = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    optimizer = copy.deepcopy(engine.optimizer.state_dict())
    steps, epoch = engine.counters.optimizer_steps, engine.scheduler.last_epoch
    _all_against(reweighter)
    out = _step(engine, reweighter, 3)
    record = json.loads((tmp_path / "weights.jsonl").read_text().splitlines()[-1])
    assert (record["case"], record["skipped"], sum(record["weights"])) == (
        "all_against",
        fallback == "skip",
        0,
    )
    assert engine.scheduler.last_epoch == epoch + 1  # the LR schedule follows the step index
    moved = any(not torch.equal(p, params[n]) for n, p in adapter_parameters(model).items())
    if fallback == "zero":  # control: a zero gradient still moves θ through AdamW's momentum
        assert moved and engine.counters.optimizer_steps == steps + 1
        return
    assert out.skip_update and not moved and engine.counters.optimizer_steps == steps
    after = engine.optimizer.state_dict()
    assert after["param_groups"] == optimizer["param_groups"]
    for key, state in optimizer["state"].items():
        assert all(torch.equal(state[k], after["state"][key][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _hand_loss(model, batch: dict) -> torch.Tensor:
    """The plain LoRA loss written out: the mean over samples of each sample's mean response-token NLL."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_sample = []
    for b in range(logits.shape[0]):
        labels = batch["labels"][b]
        terms = [
            -torch.log_softmax(logits[b, p], -1)[labels[p + 1]]
            for p in range(labels.shape[0] - 1)
            if labels[p + 1] != -100
        ]
        per_sample.append(torch.stack(terms).mean())
    return torch.stack(per_sample).mean()


def test_no_signal_takes_one_unweighted_step_equal_to_plain_lora_with_adamw_by_hand(tmp_path):
    """B = 0 ⇒ u ≡ 0: the step is a plain LoRA step. Equal response lengths, so the mean of the samples'
    mean losses is also the batch's token mean (what a plain LoRA step minimises)."""
    model = ml.add_adapter(
        tiny_model("gpt2", dtype=torch.float64), ml.LoRAConfig(r=4, target_modules=GPT2_TARGETS)
    )
    config = ReweightConfig.from_dict({"batch_size": 4})
    model.eval()  # no dropout, in the step and in the oracle alike
    engine, reweighter = _reweighter(tmp_path, model, config)
    train = reweighter.batches.train
    train.features = make_features("tr", 0, 16, seed=3)  # equal lengths
    first = [train.features[i] for i in train._order[:4]]  # the first batch EpochBatches draws
    batch = collate(first, PAD)
    params = adapter_parameters(model)
    grads = torch.autograd.grad(_hand_loss(model, batch), list(params.values()))
    before = {n: p.detach().clone() for n, p in params.items()}
    lr, (b1, b2), eps = 1e-2, engine.config.betas, engine.config.eps
    # AdamW's first step by hand: m̂ = g, v̂ = g², θ ← θ − lr·m̂/(√v̂ + eps) (weight decay 0)
    expected = {
        n: p.detach() - lr * ((1 - b1) * g / (1 - b1)) / (((1 - b2) * g * g / (1 - b2)).sqrt() + eps)
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    _step(engine, reweighter, 0)
    record = json.loads((tmp_path / "weights.jsonl").read_text().splitlines()[0])
    assert (record["case"], record["skipped"], record["weights"]) == ("no_signal", False, [0.25] * 4)
    assert record["sample_ids"] == [f["sample_id"] for f in first]
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in params.items())  # the step moved B


# --- 3. the paper's §4.1 recipe, its CPU version, and the module subsets --------------------------------


def test_attention_and_mlp_subsets_partition_the_papers_adapted_layers():
    targets = yaml.safe_load((CONFIGS / "reweight.yaml").read_text())["adapter"]["target_modules"]
    model = ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=4, target_modules=targets))
    layers = {m: set(lora_grads.selected_layers(model, m)) for m in ("all", "attention", "mlp")}
    assert layers["attention"] and layers["mlp"] and not layers["attention"] & layers["mlp"]
    assert layers["attention"] | layers["mlp"] == layers["all"]
    assert {n.rsplit(".", 1)[1] for n in layers["mlp"]} == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("modules", ["all", "attention", "mlp"])
def test_cpu_recipe_runs_with_every_module_subset(tmp_path, modules):
    recipe = yaml.safe_load((CONFIGS / "reweight_cpu.yaml").read_text())
    tiny = _recipe(tmp_path, 10)
    recipe["model"], recipe["output_dir"] = tiny["model"], tiny["output_dir"]
    recipe["data"].update(
        tasks=tiny["data"]["tasks"], val_task=tiny["data"]["val_task"], examples_per_task=20
    )
    overrides = [f"reweight.stats.modules={modules}", "train.max_steps=2", "train.progress=false"]
    run_dir = run(recipe, overrides)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["adapter"]["r"] == 32 and resolved["reweight"]["stats"]["modules"] == modules
    records = [json.loads(line) for line in (run_dir / "weights.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["case"] == "no_signal"
