"""MeTA-LoRA against oracles: the FO-MAML gradient, the outer step, -STA, counters, routing, resume."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_train_utils import PAD, FailAt, adapter_state, make_features, make_pools, max_abs_diff
from torch.func import functional_call

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import EpisodicSampler, collate
from metalora.testing import randomize_adapter, tiny_model
from metalora.train import Engine, EngineConfig, MetaConfig, MultitaskConfig, train_meta, train_multitask
from metalora.train.meta import build_sampler, task_query_grad


@dataclass
class _Episode:
    task: str
    task_id: int
    support: list
    query: list


class FixedEpisodes:
    """A sampler that returns the same episodes every iteration (for oracles)."""

    def __init__(self, episodes):
        self.episodes, self.n_tasks, self.iteration = episodes, len(episodes), 0

    def sample(self):
        self.iteration += 1
        return self.episodes

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]


def f64_model(config=None):
    model = ml.add_adapter(tiny_model("llama", dtype=torch.float64), config or ml.LoRAConfig(r=4))
    randomize_adapter(model, scale=0.3)
    return model


def sample_mean_loss(model, params, features):
    """The paper's L, in float64: the mean over samples of each sample's token-mean loss."""
    return torch.stack([hf_loss(model, params, [f]) for f in features]).mean()


def hf_loss(model, params, features):
    """The oracle's loss, written out here in float64 (HF's own ``.loss`` upcasts only to float32):
    mean over label tokens of −log softmax(logits_t)[labels_{t+1}], run with ``params`` swapped in."""
    batch = collate(features, PAD)
    logits = functional_call(
        model, params, (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = batch["labels"][:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def oracle_query_grad(model, support, query, k, alpha, loss=None):
    """θ_i by k plain SGD steps on a detached copy, then ∇L_Q at a detached copy of θ_i."""
    loss = loss or hf_loss
    theta = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    names = list(theta)
    for _ in range(k):
        leaf = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        grads = torch.autograd.grad(loss(model, leaf, support), [leaf[n] for n in names])
        theta = {n: (leaf[n] - alpha * g).detach() for n, g in zip(names, grads, strict=True)}
    phi = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    grads = torch.autograd.grad(loss(model, phi, query), [phi[n] for n in names])
    return dict(zip(names, grads, strict=True))


def test_fo_maml_gradient_equals_gradient_at_detached_adapted_copy(tmp_path):
    model = f64_model()
    support = make_features("a", 0, 4, seed=1, vary=True)
    query = make_features("a", 0, 4, seed=2, vary=True)
    cfg = MetaConfig(inner_steps=3, inner_lr=0.5, support_size=4, query_size=4)
    engine = Engine(model, EngineConfig(max_steps=1, progress=False), tmp_path)
    before = adapter_state(model)
    _, _, grads = task_query_grad(engine, support, query, cfg, PAD)
    expected = oracle_query_grad(model, support, query, k=3, alpha=0.5)
    at_theta = oracle_query_grad(model, support, query, k=0, alpha=0.5)
    assert max_abs_diff(adapter_state(model), before) == 0.0  # θ restored bit for bit
    assert max_abs_diff(grads, expected) < 1e-10
    assert max_abs_diff(expected, at_theta) > 1e-4  # the inner steps matter: the check is not vacuous


def test_sample_reduction_is_the_papers_mean_of_per_sample_losses(tmp_path):
    """``meta.loss_reduction: sample``: L_S and L_Q average each sample's token-mean loss (the paper's L).
    Oracle: float64 autograd through one sequence at a time; samples of different response lengths, so
    the two reductions differ."""
    model = f64_model()
    support = make_features("a", 0, 4, seed=1, vary=True)
    query = make_features("a", 0, 4, seed=2, vary=True)
    assert len({sum(x != -100 for x in f["labels"]) for f in support + query}) > 1  # unequal lengths
    cfg = MetaConfig(inner_steps=2, inner_lr=0.5, support_size=4, query_size=4, loss_reduction="sample")
    engine = Engine(model, EngineConfig(max_steps=1, progress=False), tmp_path)
    _, _, grads = task_query_grad(engine, support, query, cfg, PAD)
    expected = oracle_query_grad(model, support, query, k=2, alpha=0.5, loss=sample_mean_loss)
    token_mean = oracle_query_grad(model, support, query, k=2, alpha=0.5)
    assert max_abs_diff(grads, expected) < 1e-10
    assert max_abs_diff(expected, token_mean) > 1e-6  # the reductions differ here: the check can fail
    with pytest.raises(ValueError, match="loss_reduction"):
        MetaConfig(loss_reduction="mean")


def test_outer_step_is_adamw_on_task_averaged_query_grads(tmp_path):
    model = f64_model()
    episodes = [
        _Episode(
            f"t{t}",
            t,
            make_features(f"t{t}", t, 3, seed=10 + t, vary=True),
            make_features(f"t{t}", t, 3, seed=20 + t, vary=True),
        )
        for t in range(2)
    ]
    cfg = MetaConfig(n_tasks=2, inner_steps=2, support_size=3, query_size=3, inner_lr=0.3)
    # oracle: average the FO-MAML grads, one torch AdamW step at lr β on a copy
    g = [oracle_query_grad(model, e.support, e.query, k=2, alpha=0.3) for e in episodes]
    copy = {n: p.detach().clone().requires_grad_(True) for n, p in adapter_parameters(model).items()}
    opt = torch.optim.AdamW(list(copy.values()), lr=0.01, weight_decay=0.1)
    for n, p in copy.items():
        p.grad = (g[0][n] + g[1][n]) / 2
    opt.step()
    train_meta(
        model,
        FixedEpisodes(episodes),
        cfg,
        EngineConfig(max_steps=1, lr=0.01, weight_decay=0.1, progress=False),
        tmp_path,
        PAD,
    )
    assert max_abs_diff(adapter_state(model), {n: p.detach() for n, p in copy.items()}) < 1e-12


def test_sta_equals_a_plain_multitask_step_on_the_query_data(tmp_path):
    # equal label-token counts per query set, so the task average equals the mean over the union
    queries = [make_features(f"t{t}", t, 4, seed=30 + t) for t in range(2)]
    episodes = [_Episode(f"t{t}", t, make_features(f"t{t}", t, 4, seed=40 + t), queries[t]) for t in range(2)]
    sta = f64_model()
    train_meta(
        sta,
        FixedEpisodes(episodes),
        MetaConfig(sta=True, inner_lr=0.5, support_size=4, query_size=4),
        EngineConfig(max_steps=2, lr=0.01, progress=False),
        tmp_path / "sta",
        PAD,
    )
    mt = f64_model()
    counters = train_multitask(
        mt,
        queries[0] + queries[1],
        MultitaskConfig(batch_size=8),
        EngineConfig(max_steps=2, lr=0.01, progress=False),
        tmp_path / "mt",
        PAD,
    )
    assert counters.optimizer_steps == 2
    assert max_abs_diff(adapter_state(sta), adapter_state(mt)) < 1e-12
    assert max_abs_diff(adapter_state(sta), adapter_state(f64_model())) > 1e-4


@pytest.mark.parametrize("sta", [False, True])
def test_counters_count_as_the_paper(tmp_path, sta):
    model = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=4))
    cfg = MetaConfig(sta=sta, inner_lr=1e-3)  # defaults n=2, k=3, |S|=|Q|=8
    counters = train_meta(
        model,
        build_sampler(make_pools(length=10), cfg),
        cfg,
        EngineConfig(max_steps=3, lr=1e-3, progress=False),
        tmp_path,
        PAD,
    )
    per_iteration = 2 * 8 if sta else 2 * (3 * 8 + 8)
    assert per_iteration == (16 if sta else 64) == cfg.samples_per_iteration()
    assert counters.optimizer_steps == 3
    assert counters.samples == 3 * per_iteration
    assert counters.tokens == 3 * per_iteration * 10
    assert counters.wall_time_s > 0 and counters.peak_memory_bytes > 0


ROUTED = {
    "mtl_lora": lambda: ml.MTLLoRAConfig(r=4, num_tasks=3),
    "moelora": lambda: ml.MoELoRAConfig(r=4, num_tasks=3, num_experts=2),
}
UNROUTED = {
    "lora": lambda: ml.LoRAConfig(r=4),
    "dora": lambda: ml.LoRAConfig(r=4, use_dora=True),
    "hydra_lora": lambda: ml.HydraLoRAConfig(r=4, num_heads=2),
    "multilora": lambda: ml.MultiLoRAConfig(r=4, num_parallel=2),
}


@pytest.mark.parametrize("name", list(ROUTED) + list(UNROUTED))
def test_every_adapter_type_only_adapter_changes_and_output_loads(tmp_path, name):
    model = ml.add_adapter(tiny_model(), {**ROUTED, **UNROUTED}[name]())
    base_before = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_parameters(model)}
    before = adapter_state(model)
    cfg = MetaConfig(inner_steps=1, support_size=2, query_size=2, inner_lr=1e-2)
    train_meta(
        model,
        build_sampler(make_pools(length=8), cfg),
        cfg,
        EngineConfig(max_steps=2, lr=1e-2, progress=False),
        tmp_path,
        PAD,
    )
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert max_abs_diff(adapter_state(model), before) > 0
    loaded = ml.load_adapter(tiny_model(), tmp_path / "adapter")
    assert max_abs_diff(adapter_state(loaded), adapter_state(model)) == 0.0


def test_routed_adapter_takes_the_task_id_from_the_episode(tmp_path):
    # MTL-LoRA's Λ_t gets a gradient only from samples of task t: with episodes of tasks 0 and 2 only,
    # Λ_1 must stay exactly at its init (AdamW without weight decay does not move a zero-gradient tensor).
    model = ml.add_adapter(tiny_model(), ml.MTLLoRAConfig(r=4, num_tasks=3))
    randomize_adapter(model)
    pools = make_pools(length=8)
    episodes = [
        _Episode("t0", 0, pools["t0"][:2], pools["t0"][2:4]),
        _Episode("t2", 2, pools["t2"][:2], pools["t2"][2:4]),
    ]
    before = adapter_state(model)
    train_meta(
        model,
        FixedEpisodes(episodes),
        MetaConfig(inner_steps=1, support_size=2, query_size=2, inner_lr=0.1),
        EngineConfig(max_steps=2, lr=1e-2, progress=False),
        tmp_path,
        PAD,
    )
    after = adapter_state(model)
    lam = [k for k in after if k.endswith("lora_lambda")]
    assert lam
    for k in lam:
        assert torch.equal(after[k][1], before[k][1])
        assert not torch.equal(after[k][0], before[k][0]) and not torch.equal(after[k][2], before[k][2])


def test_killed_and_resumed_run_ends_with_the_same_adapter(tmp_path):
    cfg = MetaConfig(inner_steps=2, support_size=2, query_size=2, inner_lr=1e-2)
    engine_cfg = dict(max_steps=6, lr=1e-2, checkpoint_every=2, progress=False)

    def fresh():
        model = ml.add_adapter(tiny_model(), ml.MTLLoRAConfig(r=4, num_tasks=3))
        return model, EpisodicSampler(make_pools(length=8), 2, 2, 2, seed=7)

    model, sampler = fresh()
    full = train_meta(model, sampler, cfg, EngineConfig(**engine_cfg), tmp_path / "full", PAD)
    expected = adapter_state(model)

    model, sampler = fresh()
    with pytest.raises(KeyboardInterrupt):  # dies inside iteration 5, after the step-4 checkpoint
        train_meta(model, FailAt(sampler, 4), cfg, EngineConfig(**engine_cfg), tmp_path / "cut", PAD)
    assert (tmp_path / "cut/checkpoints/latest").read_text().strip() == "step-00000004"
    model, sampler = fresh()
    resumed = train_meta(model, sampler, cfg, EngineConfig(**engine_cfg), tmp_path / "cut", PAD)
    assert max_abs_diff(adapter_state(model), expected) == 0.0
    assert (resumed.optimizer_steps, resumed.samples, resumed.tokens) == (
        full.optimizer_steps,
        full.samples,
        full.tokens,
    )
    losses = {}
    for run in ("full", "cut"):
        import json

        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r]
    assert losses["cut"] == losses["full"]


def test_adapter_is_mergeable_and_exportable(tmp_path):
    model = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=4))
    cfg = MetaConfig(inner_steps=1, support_size=2, query_size=2, inner_lr=1e-2)
    train_meta(
        model,
        build_sampler(make_pools(length=8), cfg),
        cfg,
        EngineConfig(max_steps=2, lr=5e-2, progress=False),
        tmp_path,
        PAD,
    )
    x = collate(make_features("t0", 0, 2, length=8), PAD)["input_ids"]
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        merged = ml.merge(model)(x).logits
    assert torch.allclose(adapted, merged, atol=1e-5)
    ml.export_peft(ml.load_adapter(tiny_model(), tmp_path / "adapter"), tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
