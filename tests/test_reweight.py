"""META-LoRA reweighting against oracles: a float64 brute-force per-sample reference of the low-rank and
dense statistics, explicit per-sample gradient dot products for ``exact``, Σ w_i ∇ℓ_i for the update."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_train_utils import PAD, adapter_state, make_features, max_abs_diff

import metalora as ml
from metalora.adapters import adapter_layers, adapter_parameters, layer_bottlenecks
from metalora.data import collate
from metalora.testing import randomize_adapter, tiny_model
from metalora.train import EngineConfig, lora_grads
from metalora.train import similarity as sim
from metalora.train.config import RunConfig
from metalora.train.reweight import (
    ReweightConfig,
    ReweightConfigError,
    reweighted_gradient,
    train_reweight,
    validation_stats,
)

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2 is float64 end to end (Llama's RMSNorm runs in fp32)


def f64_model(adapter: str = "lora", family: str = "gpt2"):
    targets = GPT2_TARGETS if family == "gpt2" else None
    config = {
        "lora": ml.LoRAConfig(r=4, target_modules=targets),
        "mtl_lora": ml.MTLLoRAConfig(r=4, num_tasks=2, num_up=2, target_modules=targets),
    }[adapter]
    model = ml.add_adapter(tiny_model(family, dtype=torch.float64), config)
    randomize_adapter(model, scale=0.3)
    return model


def batches(n_train: int = 6, n_val: int = 3, task_ids=(0, 0)):
    train = make_features("tr", task_ids[0], n_train, length=12, seed=1, vary=True)
    val = make_features("va", task_ids[1], n_val, length=10, seed=2, vary=True)
    if task_ids[0] != task_ids[1]:
        for k, f in enumerate(train):
            f["task_id"] = k % 2
    return train, val


def run_step(model, train, val, config):
    for p in model.parameters():
        p.grad = None
    v = validation_stats(model, collate(val, PAD), config, len(val))
    result = reweighted_gradient(model, collate(train, PAD), v, config, len(train))
    grads = {n: p.grad.detach().clone() for n, p in adapter_parameters(model).items()}
    return result, grads


# --- the brute-force reference -------------------------------------------------------------------------


def single_sample_stats(model, feature, length, similarity, positions):
    """One sample alone (padded to the batch length): ā and ĝ at every site, by explicit loops."""
    batch = collate([feature], PAD, pad_to_multiple_of=length)
    layers = adapter_layers(model)
    sites = {n: layer_bottlenecks(m)[0] for n, m in layers.items()} if similarity == "low_rank" else layers
    acts, watched = {}, {}

    def hook(name):
        def fn(module, args, out):
            acts[name] = args[0]
            watched[name] = args[0] if similarity == "low_rank" else out

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in sites.items()]
    ctx = ml.task_ids(model, [feature["task_id"]]) if ml.is_task_routed(model) else torch.enable_grad()
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
    for h in handles:
        h.remove()
    labels = batch["labels"][0]
    terms = [
        -torch.log_softmax(logits[p], -1)[labels[p + 1]] for p in range(length - 1) if labels[p + 1] != -100
    ]
    loss = torch.stack(terms).mean() if terms else logits.sum() * 0
    names = list(sites)
    grads = torch.autograd.grad(loss, [watched[n] for n in names], allow_unused=True)
    n_real = int(batch["attention_mask"].sum())
    if positions == "response":
        pos = [p for p in range(length - 1) if labels[p + 1] != -100]
    elif positions == "nonpad":
        pos = list(range(n_real))
    else:
        pos = list(range(length))
    out = {}
    for n, g in zip(names, grads, strict=True):
        a = acts[n].detach()[0]
        g = torch.zeros_like(watched[n][0]) if g is None else g[0]
        if positions == "all":
            abar, gbar = a.mean(0), g.mean(0)
        else:
            abar = sum((a[p] for p in pos), torch.zeros_like(a[0])) / max(len(pos), 1)
            gbar = sum((g[p] for p in pos), torch.zeros_like(g[0]))
        out[n] = (abar, gbar)
    return out, float(loss.detach()), bool(terms)


def brute_force_weights(
    model, train, val, similarity="low_rank", positions="response", aggregation="per_sample", score="dot"
):
    lt = max(len(f["input_ids"]) for f in train)
    lv = max(len(f["input_ids"]) for f in val)
    tr = [single_sample_stats(model, f, lt, similarity, positions) for f in train]
    va = [single_sample_stats(model, f, lv, similarity, positions)[0] for f in val]
    u = []
    for stats, _, _ in tr:
        total = 0.0
        for n, (a, g) in stats.items():
            if aggregation == "per_sample":
                total += sum(float(a @ v[n][0]) * float(g @ v[n][1]) for v in va) / len(va)
            else:
                av = sum(v[n][0] for v in va) / len(va)
                gv = sum(v[n][1] for v in va) / len(va)
                total += float(a @ av) * float(g @ gv)
        if score == "cosine":  # divided by the rank-one estimate of ‖∇ℓ_i‖
            total /= math.sqrt(sum(float(a @ a) * float(g @ g) for a, g in stats.values()))
        u.append(total)
    u = torch.tensor(u, dtype=torch.float64)
    pos = u.clamp(min=0)
    return u, pos / pos.sum(), [s[1] for s in tr]


def test_cosine_score_equals_float64_brute_force():
    model = f64_model("lora")
    train, val = batches()
    result, _ = run_step(model, train, val, ReweightConfig.from_dict({"direction": {"score": "cosine"}}))
    u_ref, w_ref, _ = brute_force_weights(model, train, val, score="cosine")
    dot, _ = run_step(f64_model("lora"), train, val, ReweightConfig())
    assert not torch.allclose(result.weights, dot.weights)  # the option changes the weights
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-9, atol=1e-12 * float(u_ref.abs().max()))
    torch.testing.assert_close(result.weights, w_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "adapter,similarity,positions,aggregation",
    [
        ("lora", "low_rank", "response", "per_sample"),
        ("lora", "low_rank", "all", "mean"),
        ("lora", "dense", "response", "per_sample"),
        ("lora", "dense", "nonpad", "mean"),
        ("mtl_lora", "low_rank", "response", "per_sample"),
        ("mtl_lora", "dense", "response", "mean"),
    ],
)
def test_weights_equal_float64_brute_force(adapter, similarity, positions, aggregation):
    model = f64_model(adapter)
    train, val = batches(task_ids=(0, 1) if adapter == "mtl_lora" else (0, 0))
    config = ReweightConfig.from_dict(
        {
            "stats": {"similarity": similarity, "positions": positions},
            "direction": {"aggregation": aggregation},
        }
    )
    result, _ = run_step(model, train, val, config)
    u_ref, w_ref, losses = brute_force_weights(model, train, val, similarity, positions, aggregation)
    assert result.scheme == ("fused" if adapter == "lora" else "two_backward")
    assert float(u_ref.abs().max()) > 0 and (u_ref > 0).any()
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-9, atol=1e-12 * float(u_ref.abs().max()))
    torch.testing.assert_close(result.weights, w_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        result.losses, torch.tensor(losses, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )


def test_low_rank_weights_on_llama_within_its_fp32_norms():
    """Llama's RMSNorm computes in fp32 even in an fp64 model, so the match is to ~fp32 precision."""
    model = f64_model("lora", family="llama")
    train, val = batches()
    result, _ = run_step(model, train, val, ReweightConfig())
    u_ref, w_ref, _ = brute_force_weights(model, train, val)
    torch.testing.assert_close(result.weights, w_ref, rtol=1e-5, atol=1e-6)


# --- exact mode ------------------------------------------------------------------------------------------


def per_sample_gradient(model, feature, params):
    batch = collate([feature], PAD)
    ctx = ml.task_ids(model, [feature["task_id"]]) if ml.is_task_routed(model) else torch.enable_grad()
    with ctx:
        logits = model(input_ids=batch["input_ids"]).logits[0]
        labels = batch["labels"][0]
        terms = [
            -torch.log_softmax(logits[p], -1)[labels[p + 1]]
            for p in range(len(labels) - 1)
            if labels[p + 1] != -100
        ]
        loss = torch.stack(terms).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)
    }


@pytest.mark.parametrize("adapter,modules", [("lora", "all"), ("lora", "mlp"), ("mtl_lora", "attention")])
def test_exact_mode_equals_explicit_per_sample_gradient_dot_products(adapter, modules):
    model = f64_model(adapter)
    train, val = batches(n_train=4, n_val=2, task_ids=(0, 1) if adapter == "mtl_lora" else (0, 0))
    result, grads = run_step(
        model, train, val, ReweightConfig.from_dict({"stats": {"similarity": "exact", "modules": modules}})
    )
    params = adapter_parameters(model)
    chosen = lora_grads.selected_parameters(model, modules)
    assert 0 < len(chosen) < len(params) or modules == "all"
    g_train = [per_sample_gradient(model, f, params) for f in train]
    g_val = [per_sample_gradient(model, f, params) for f in val]
    u_ref = torch.tensor(
        [sum(float((g[n] * sum(v[n] for v in g_val) / len(g_val)).sum()) for n in chosen) for g in g_train],
        dtype=torch.float64,
    )
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-9, atol=1e-14)
    cosine, _ = run_step(
        model,
        train,
        val,
        ReweightConfig.from_dict(
            {"stats": {"similarity": "exact", "modules": modules}, "direction": {"score": "cosine"}}
        ),
    )
    norms = torch.tensor(
        [math.sqrt(sum(float((g[n] ** 2).sum()) for n in chosen)) for g in g_train], dtype=torch.float64
    )
    torch.testing.assert_close(cosine.scores, u_ref / norms, rtol=1e-9, atol=1e-14)
    w = u_ref.clamp(min=0) / u_ref.clamp(min=0).sum()
    torch.testing.assert_close(result.weights, w, rtol=1e-9, atol=1e-12)
    expected = {n: sum(float(w[i]) * g_train[i][n] for i in range(len(train))) for n in params}
    assert max_abs_diff(grads, expected) < 1e-12


# --- the update ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter,scheme", [("lora", "fused"), ("lora", "two_backward"), ("mtl_lora", "auto")]
)
def test_weighted_loss_gradient_equals_sum_of_weighted_per_sample_gradients(adapter, scheme):
    model = f64_model(adapter)
    train, val = batches(task_ids=(0, 1) if adapter == "mtl_lora" else (0, 0))
    result, grads = run_step(model, train, val, ReweightConfig(scheme=scheme))
    params = adapter_parameters(model)
    per_sample = [per_sample_gradient(model, f, params) for f in train]
    expected = {
        n: sum(float(result.weights[i]) * per_sample[i][n] for i in range(len(train))) for n in params
    }
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0 and max_abs_diff(grads, expected) < 1e-11 * max(scale, 1.0)
    assert result.loss == pytest.approx(float((result.weights * result.losses).sum()), rel=1e-12)


def test_fused_scheme_equals_two_backward_scheme():
    model = f64_model()
    train, val = batches()
    fused, g_fused = run_step(
        model, train, val, ReweightConfig.from_dict({"scheme": "fused", "stats": {"similarity": "dense"}})
    )
    two, g_two = run_step(
        model,
        train,
        val,
        ReweightConfig.from_dict({"scheme": "two_backward", "stats": {"similarity": "dense"}}),
    )
    assert torch.equal(fused.weights, two.weights)
    assert max_abs_diff(g_fused, g_two) < 1e-14


def test_fused_is_refused_where_it_does_not_cover_the_adapter():
    model = ml.add_adapter(
        tiny_model("gpt2", dtype=torch.float64),
        ml.LoRAConfig(r=4, use_dora=True, target_modules=GPT2_TARGETS),
    )
    assert not lora_grads.fused_supported(model)
    train, val = batches(2, 1)
    with pytest.raises(ReweightConfigError, match="fused"):
        run_step(model, train, val, ReweightConfig(scheme="fused"))
    result, _ = run_step(model, train, val, ReweightConfig(scheme="auto"))
    assert result.scheme == "two_backward"


# --- weights: invariants, the δ case, masked samples ----------------------------------------------------


def test_weights_are_non_negative_and_sum_to_one():
    model = f64_model()
    train, val = batches(n_train=8)
    for config in (
        ReweightConfig(),
        ReweightConfig.from_dict({"weights": {"negative": "shift"}}),
        ReweightConfig.from_dict({"stats": {"similarity": "dense"}}),
    ):
        result, _ = run_step(model, train, val, config)
        assert (result.weights >= 0).all() and float(result.weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert not result.fallback


def test_fresh_lora_has_g_zero_no_signal_and_takes_an_unweighted_step():
    """u ≡ 0 (B = 0): the default is one unweighted step (w = 1/B), recorded as ``no_signal``; with
    ``no_signal="fallback"`` Eq. 8 is read literally (``zero``: w = 0 and a step; ``skip``: no step)."""
    model = ml.add_adapter(
        tiny_model("gpt2", dtype=torch.float64), ml.LoRAConfig(r=4, target_modules=GPT2_TARGETS)
    )
    train, val = batches(n_train=4)
    result, grads = run_step(model, train, val, ReweightConfig())  # B = 0 ⇒ g = ∂ℓ/∂z = Bᵀ ∂ℓ/∂h = 0
    assert torch.equal(result.scores, torch.zeros(4, dtype=torch.float64))
    assert result.fallback and torch.equal(result.weights, torch.full((4,), 0.25, dtype=torch.float64))
    assert (result.case, result.skip) == ("no_signal", False)
    assert result.metrics["weight_fallback"] == 1.0 and result.metrics["weight_skipped"] == 0.0
    assert any(float(g.abs().max()) > 0 for g in grads.values())  # A's gradient is 0 but B's is not
    for fallback, skip in (("zero", False), ("skip", True)):
        config = ReweightConfig.from_dict({"weights": {"fallback": fallback, "no_signal": "fallback"}})
        zero, grads0 = run_step(model, train, val, config)
        assert zero.fallback and torch.equal(zero.weights, torch.zeros(4, dtype=torch.float64))
        assert (zero.case, zero.skip) == ("no_signal", skip)
        assert all(float(g.abs().max()) == 0 for g in grads0.values())
    dense, _ = run_step(
        model, train, val, ReweightConfig.from_dict({"stats": {"similarity": "dense"}})
    )  # D sees ∂ℓ/∂h ≠ 0 at once
    assert not dense.fallback and dense.case == "eq8"


def test_all_masked_samples_get_weight_zero_and_no_nan():
    model = f64_model()
    train, val = batches(n_train=4)
    train[1]["labels"] = [-100] * len(train[1]["labels"])
    train[3]["labels"] = [-100] * (len(train[3]["labels"]) - 1) + [
        train[3]["input_ids"][-1]
    ]  # one label token
    for config in (
        ReweightConfig(),
        ReweightConfig.from_dict({"stats": {"positions": "all"}, "weights": {"negative": "shift"}}),
        ReweightConfig.from_dict({"stats": {"similarity": "exact"}}),
    ):
        result, grads = run_step(model, train, val, config)
        assert result.weights[1] == 0 and not bool(result.valid[1]) and bool(result.valid[3])
        assert result.losses[1] == 0
        assert torch.isfinite(result.scores).all() and torch.isfinite(result.weights).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert float(result.weights.sum()) == pytest.approx(1.0)


def test_clipped_weights_by_hand():
    u = torch.tensor([2.0, -1.0, 6.0, 0.0], dtype=torch.float64)
    w = sim.clipped_weights(u)
    assert torch.allclose(w.w, torch.tensor([0.25, 0.0, 0.75, 0.0], dtype=torch.float64)) and not w.fallback
    s = sim.clipped_weights(u, negative="shift")  # u + 2 = [4, 1, 8, 2]
    assert torch.allclose(s.w, torch.tensor([4, 1, 8, 2], dtype=torch.float64) / 15) and s.shifted
    d = sim.clipped_weights(u, delta=4.0)
    assert torch.allclose(d.w, torch.tensor([2, 0, 6, 0], dtype=torch.float64) / 12) and not d.fallback
    assert sim.clipped_weights(u, delta=8.0).fallback  # Σ max(u, 0) ≤ δ
    valid = torch.tensor([True, True, False, True])
    m = sim.clipped_weights(u, valid=valid)
    assert torch.allclose(m.w, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    f = sim.clipped_weights(-u.abs(), valid=valid, fallback="uniform")  # all against: our uniform option
    assert f.fallback and torch.allclose(f.w, torch.tensor([1, 1, 0, 1], dtype=torch.float64) / 3)
    assert (f.case, f.skip) == ("all_against", False)
    k = sim.clipped_weights(-u.abs(), valid=valid)  # the paper's Eq. 8 (default): w = 0, step skipped
    assert torch.equal(k.w, torch.zeros(4, dtype=torch.float64)) and (k.case, k.skip) == ("all_against", True)
    z = sim.clipped_weights(-u.abs(), valid=valid, fallback="zero")
    assert torch.equal(z.w, torch.zeros(4, dtype=torch.float64)) and (z.case, z.skip) == (
        "all_against",
        False,
    )
    n = sim.clipped_weights(torch.zeros(4, dtype=torch.float64), valid=valid)  # no signal: unweighted
    assert torch.equal(n.w, torch.tensor([1, 1, 0, 1], dtype=torch.float64) / 3) and n.case == "no_signal"
    assert not n.skip


def test_weight_statistics_by_hand():
    stats = sim.weight_statistics(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert stats["weight_entropy"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert stats["weight_ess"] == pytest.approx(2.0) and stats["weight_frac_zero"] == 0.5
    uniform = sim.weight_statistics(torch.full((8,), 1 / 8, dtype=torch.float64))
    assert uniform["weight_ess"] == pytest.approx(8.0) and uniform["weight_frac_zero"] == 0.0


def test_loss_positions_are_the_shifted_label_mask():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 3, 4, 7, 8]])
    assert sim.loss_positions(labels).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]
    wa, wg = sim.position_weights(labels, torch.tensor([[1, 1, 1, 1, 0], [1] * 5]), "response")
    assert wa[0].tolist() == [0, 0.5, 0.5, 0, 0] and wg[0].tolist() == [0, 1, 1, 0, 0]


def test_module_subsets_select_attention_or_mlp_sites():
    model = f64_model()
    attn = lora_grads.similarity_sites(model, "low_rank", "attention")
    mlp = lora_grads.similarity_sites(model, "dense", "mlp")
    assert attn and all(".attn." in n for n in attn) and all(".mlp." in n for n in mlp)
    assert len(lora_grads.similarity_sites(model, "low_rank", "all")) == len(attn) + len(
        lora_grads.selected_layers(model, "mlp")
    )
    only_attn = ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="selects none"):
        lora_grads.selected_layers(only_attn, "mlp")


# --- the algorithm on the engine -------------------------------------------------------------------------


def test_train_reweight_end_to_end_writes_weights_metrics_and_plot(tmp_path):
    model = ml.add_adapter(tiny_model("llama"), ml.LoRAConfig(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = make_features("tr", 0, 12, seed=3, vary=True)
    val = make_features("va", 0, 4, seed=4)
    config = ReweightConfig.from_dict(
        {
            "batch_size": 4,
            "val_ratio": 2,
            "published_code": {"unweighted_first_step": True, "val_step_every": 2},
        }
    )
    counters = train_reweight(
        model,
        train,
        val,
        config,
        EngineConfig(max_steps=4, lr=1e-2, device="cpu", progress=False),
        tmp_path,
        PAD,
    )
    records = [json.loads(line) for line in (tmp_path / "weights.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["skipped"]]
    # Eq. 8 (default fallback "skip"): a batch whose u are all ≤ 0 takes no optimizer step
    assert all(r["case"] == "all_against" and max(r["u"]) <= 0 < -min(r["u"]) for r in skipped)
    assert all(sum(r["weights"]) == 0 for r in skipped)
    assert counters.optimizer_steps == 4 + 2 - len(skipped)  # + validation-loss steps at steps 0 and 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(adapter_parameters(model))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 4 and all(
        {"weight_entropy", "weight_ess", "weight_frac_zero", "val_loss"} <= m.keys() for m in steps
    )
    assert steps[0]["weight_ess"] == pytest.approx(4.0)  # the unweighted first step
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["case"] == "unweighted"
    assert all(
        set(r["sample_ids"]) <= {f["sample_id"] for f in train} and sum(r["weights"]) == pytest.approx(1.0)
        for r in records
        if not r["skipped"]
    )
    assert (tmp_path / "weights_hist.png").stat().st_size > 1000
    assert len((tmp_path / "sample_weights.jsonl").read_text().splitlines()) == len(
        {s for r in records for s in r["sample_ids"]}
    )
    assert (tmp_path / "adapter").is_dir()


def test_config_is_validated():
    with pytest.raises(ReweightConfigError, match=r"reweight\.stats\.similarity"):
        ReweightConfig.from_dict({"stats": {"similarity": "cosine"}})
    # the ratio sizes the validation *set* (reweight_data); the per-step batch is the training batch
    assert ReweightConfig(batch_size=50, val_ratio=50).effective_val_batch_size == 50
    assert ReweightConfig(batch_size=8).effective_val_batch_size == 8
    assert ReweightConfig(batch_size=20, val_ratio=5, val_batch_size=4).effective_val_batch_size == 4


def test_adapter_state_untouched_by_scoring_alone():
    model = f64_model()
    state = adapter_state(model)
    train, val = batches()
    run_step(model, train, val, ReweightConfig())
    assert max_abs_diff(state, adapter_state(model)) == 0


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_shipped_recipe_is_the_papers_section_4_1_setup():
    """Oracle: the paper's §4.1 values typed out here; the CPU recipe differs only where it says so."""
    paper = RunConfig.from_yaml(CONFIGS / "reweight.yaml")
    assert paper.algorithm == "reweight"
    assert (paper.adapter["r"], paper.adapter["target_modules"]) == (32, PAPER_TARGETS)
    t = paper.train
    assert (t.lr, t.schedule, t.warmup_steps, t.betas, t.precision) == (
        5e-4,
        "cosine",
        0,
        (0.9, 0.95),
        "bf16",
    )
    assert (paper.reweight.batch_size, paper.data.max_length, paper.reweight.val_ratio) == (4, 400, 10)
    # the reweighting options are at their defaults (the paper's), but for the batch
    assert paper.reweight == ReweightConfig(batch_size=4)
    cpu = RunConfig.from_yaml(CONFIGS / "reweight_cpu.yaml")
    differ = {
        ("data", "examples_per_task"),
        ("data", "max_length"),
        ("train", "max_steps"),
        ("train", "precision"),
        ("train", "device"),
        ("train", "checkpoint_every"),
        ("name", None),
    }
    a, b = paper.to_dict(), cpu.to_dict()
    got = {
        (k, sub)
        for k in a
        for sub in (a[k] if isinstance(a[k], dict) else [None])
        if (a[k] if sub is None else a[k][sub]) != (b[k] if sub is None else b[k][sub])
    }
    assert got == differ
    assert (cpu.train.precision, cpu.train.device) == ("fp32", "cpu")
    assert yaml.safe_load((CONFIGS / "reweight_cpu.yaml").read_text())["name"] == "reweight_cpu"
