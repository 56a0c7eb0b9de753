"""``score="layer_cosine"`` against oracles: hand-computed cosines, explicit float64 site-normalised rank-one
vectors (low rank and dense), and true per-sample gradients normalised per layer by a loop (exact)."""

from __future__ import annotations

import math

import pytest
import torch
from test_reweight import batches, f64_model, per_sample_gradient, run_step
from test_train_utils import PAD
from test_val_direction import explicit_direction, rank_one_rows, val_with_two_answers

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import collate
from metalora.testing import tiny_model
from metalora.train import lora_grads
from metalora.train import similarity as sim
from metalora.train.reweight import (
    ReweightConfig,
    ReweightConfigError,
    reweighted_gradient,
    validation_stats,
)
from metalora.train.val_direction import answer_groups


def stats(*rows):
    """{site: SiteStats} for one train-or-validation set from ((a rows), (g rows)) per site."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {f"s{k}": sim.SiteStats(t(a), t(g)) for k, (a, g) in enumerate(rows)}


def test_site_cosines_by_hand_and_every_site_votes_equally():
    # site 0: cos(ā) = (3·4 + 4·3)/25 = 0.96, cos(ĝ) = 0          → 0
    # site 1: cos(ā) = 1/√2,                 cos(ĝ) = (−2)/(2·1) = −1 → −1/√2
    train = stats(([[3.0, 4.0]], [[1.0, 0.0]]), ([[1.0, 0.0]], [[2.0, 0.0]]))
    val = stats(([[4.0, 3.0]], [[0.0, 2.0]]), ([[1.0, 1.0]], [[-1.0, 0.0]]))
    s = sim.similarity_matrix(sim.unit_stats(train), sim.unit_stats(val))
    torch.testing.assert_close(s, torch.tensor([[-1 / math.sqrt(2)]], dtype=torch.float64))
    # scaling one site's activations by 1000 changes the dot score 1000-fold, not the site cosines
    loud = stats(([[3.0, 4.0]], [[1.0, 0.0]]), ([[1000.0, 0.0]], [[2.0, 0.0]]))
    torch.testing.assert_close(sim.similarity_matrix(sim.unit_stats(loud), sim.unit_stats(val)), s)
    assert float(sim.similarity_matrix(loud, val)) == 1000 * float(sim.similarity_matrix(train, val))
    # a zero vector (B = 0 makes ĝ = 0) stays zero instead of dividing by zero
    zero = sim.unit_stats(stats(([[0.0, 0.0]], [[0.0, 0.0]])))["s0"]
    assert torch.equal(zero.a, torch.zeros(1, 2, dtype=torch.float64)) and torch.equal(zero.g, zero.a)


@pytest.mark.parametrize(
    "adapter,similarity,balance,shared",
    [
        ("lora", "low_rank", "none", "keep"),
        ("lora", "low_rank", "answer", "remove"),
        ("lora", "dense", "none", "remove"),
        ("mtl_lora", "low_rank", "answer", "keep"),
    ],
)
def test_scores_equal_explicit_site_normalised_rank_one_vectors(adapter, similarity, balance, shared):
    model = f64_model(adapter)
    train, _ = batches()
    val = val_with_two_answers()
    config = ReweightConfig.from_dict(
        {
            "similarity": similarity,
            "score": "layer_cosine",
            "val_balance": balance,
            "shared_direction": shared,
        }
    )
    v = validation_stats(model, collate(val, PAD), config, len(val), groups=answer_groups(val))
    result = reweighted_gradient(model, collate(train, PAD), v, config, len(train))
    rows_val = rank_one_rows(model, val, similarity, unit_sites=True)
    direction = explicit_direction(rows_val, answer_groups(val), balance, shared)
    u_ref = rank_one_rows(model, train, similarity, unit_sites=True) @ direction
    assert float(u_ref.abs().max()) > 0
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-8, atol=1e-11 * float(u_ref.abs().max()))
    w_ref = u_ref.clamp(min=0) / u_ref.clamp(min=0).sum()
    torch.testing.assert_close(result.weights, w_ref, rtol=1e-8, atol=1e-12)
    plain, _ = run_step(
        f64_model(adapter),
        train,
        val,
        ReweightConfig.from_dict({"similarity": similarity, "score": "cosine"}),
    )
    assert not torch.allclose(result.scores, plain.scores)  # the per-site normalisation changes u


@pytest.mark.parametrize("adapter,modules", [("lora", "all"), ("mtl_lora", "mlp")])
def test_exact_scores_equal_per_layer_normalised_per_sample_gradients(adapter, modules):
    model = f64_model(adapter)
    train, _ = batches(n_train=4)
    val = val_with_two_answers()
    config = ReweightConfig.from_dict({"similarity": "exact", "modules": modules, "score": "layer_cosine"})
    result, _ = run_step(model, train, val, config)
    params = adapter_parameters(model)
    chosen = list(lora_grads.selected_parameters(model, modules))
    layers: dict[str, list[str]] = {}
    for n in chosen:  # a layer's tensors share the path before ".lora_" (PEFT and metalora names alike)
        layers.setdefault(n.split(".lora_")[0], []).append(n)
    assert len(layers) > 1

    def row(f):
        g = per_sample_gradient(model, f, params)
        parts = [torch.cat([g[n].flatten() for n in names]) for names in layers.values()]
        return torch.cat([p / p.norm() for p in parts]).double()

    rows_val = torch.stack([row(f) for f in val])
    u_ref = torch.stack([row(f) for f in train]) @ rows_val.mean(0)
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-8, atol=1e-12 * float(u_ref.abs().max()))


def test_fresh_lora_falls_back_to_uniform_without_nan():
    model = ml.add_adapter(tiny_model("gpt2", dtype=torch.float64), ml.LoRAConfig(r=4))  # B = 0 ⇒ ĝ = 0
    train, val = batches()
    result, _ = run_step(model, train, val, ReweightConfig.from_dict({"score": "layer_cosine"}))
    assert result.fallback and torch.isfinite(result.scores).all()
    torch.testing.assert_close(result.weights, torch.full((len(train),), 1 / len(train), dtype=torch.float64))


def test_layer_cosine_needs_per_sample_validation_statistics():
    with pytest.raises(ReweightConfigError, match=r"reweight\.direction\.aggregation.*layer_cosine"):
        ReweightConfig.from_dict({"score": "layer_cosine", "val_aggregation": "mean"})
