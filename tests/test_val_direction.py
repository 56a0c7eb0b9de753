"""The validation direction options (``val_balance``, ``shared_direction``) against explicit float64
vectors: the rank-one gradient estimates ĝ āᵀ (low rank) or the true per-sample gradients (exact) are
formed as P-dimensional vectors, the direction is built from them with an SVD, and u_i = ⟨∇ℓ_i, G⟩."""

from __future__ import annotations

import pytest
import torch
from test_reweight import batches, f64_model, per_sample_gradient, run_step, single_sample_stats
from test_train_utils import PAD, make_features

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import collate
from metalora.testing import tiny_model
from metalora.train import similarity as sim
from metalora.train.reweight import (
    ReweightConfig,
    ReweightConfigError,
    reweighted_gradient,
    validation_stats,
)
from metalora.train.val_direction import answer_groups, validation_coefficients


def with_answers(features, answers):
    """Copies of ``features`` whose response tokens are replaced by the token lists in ``answers``."""
    out = []
    for f, answer in zip(features, answers, strict=True):
        prompt = [t for t, y in zip(f["input_ids"], f["labels"], strict=True) if y == -100]
        out.append({**f, "input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def val_with_two_answers():
    val = make_features("va", 0, 5, length=10, seed=2, vary=True)
    return with_answers(val, [[7, 8], [9], [7, 8], [7, 8], [9]])  # groups 0, 1, 0, 0, 1


def explicit_direction(rows: torch.Tensor, groups, balance: str, shared: str) -> torch.Tensor:
    """G from the [|V|, P] validation gradients themselves (no Gram matrix)."""
    if balance == "answer":
        units = []
        for a in sorted(set(groups)):
            m = rows[[i for i, g in enumerate(groups) if g == a]].mean(0)
            units.append(m / m.norm())
        direction = torch.stack(units).mean(0)
    else:
        direction = rows.mean(0)
    if shared == "remove":
        top = torch.linalg.svd(rows, full_matrices=False).Vh[0]
        direction = direction - (direction @ top) * top
    return direction


def rank_one_rows(model, features, similarity: str = "low_rank", unit_sites: bool = False) -> torch.Tensor:
    """Each sample's Σ_l-concatenated flatten(ĝ āᵀ), by the brute-force single-sample loop; with
    ``unit_sites`` every site's part is divided by its own norm (``score="layer_cosine"``)."""
    length = max(len(f["input_ids"]) for f in features)
    rows = []
    for f in features:
        stats, _, _ = single_sample_stats(model, f, length, similarity, "response")
        parts = [torch.outer(g, a).flatten() for a, g in stats.values()]
        rows.append(torch.cat([p / p.norm() for p in parts] if unit_sites else parts))
    return torch.stack(rows).double()


def test_answer_groups_follow_the_response_tokens():
    assert answer_groups(val_with_two_answers()) == [0, 1, 0, 0, 1]
    assert answer_groups(make_features("x", 0, 3, seed=4)) == [0, 1, 2]


def test_coefficients_by_hand():
    # two validation gradients (3, 0) and (0, 4) with different answers: K = diag(9, 16)
    gram = torch.tensor([[9.0, 0.0], [0.0, 16.0]], dtype=torch.float64)
    paper = validation_coefficients(gram)
    torch.testing.assert_close(paper, torch.tensor([0.5, 0.5], dtype=torch.float64))
    balanced = validation_coefficients(gram, [0, 1], "answer")  # G = ((1, 0) + (0, 1)) / 2
    torch.testing.assert_close(balanced, torch.tensor([1 / 6, 1 / 8], dtype=torch.float64))
    # the top direction of {(3, 0), (0, 4)} is (0, 1): removing it leaves G = (1/2, 0) = (1/6)·(3, 0)
    both = validation_coefficients(gram, [0, 1], "answer", "remove")
    torch.testing.assert_close(both, torch.tensor([1 / 6, 0.0], dtype=torch.float64))
    # a group whose gradients cancel (or B = 0) pulls with nothing rather than dividing by zero
    zero = validation_coefficients(torch.zeros(2, 2, dtype=torch.float64), [0, 0], "answer", "remove")
    assert torch.equal(zero, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="one answer group per validation sample"):
        validation_coefficients(gram, [0], "answer")


@pytest.mark.parametrize("balance,shared", [("answer", "keep"), ("none", "remove"), ("answer", "remove")])
def test_low_rank_scores_equal_explicit_rank_one_vectors(balance, shared):
    model = f64_model("lora")
    train, _ = batches()
    val = val_with_two_answers()
    config = ReweightConfig.from_dict({"val_balance": balance, "shared_direction": shared})
    # run_step does not pass the answer groups: the two halves as the Reweighter calls them
    v = validation_stats(model, collate(val, PAD), config, len(val), groups=answer_groups(val))
    result = reweighted_gradient(model, collate(train, PAD), v, config, len(train))
    direction = explicit_direction(rank_one_rows(model, val), answer_groups(val), balance, shared)
    u_ref = rank_one_rows(model, train) @ direction
    assert float(u_ref.abs().max()) > 0
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-8, atol=1e-11 * float(u_ref.abs().max()))
    paper, _ = run_step(f64_model("lora"), train, val, ReweightConfig())
    assert not torch.allclose(result.scores, paper.scores)  # the option changes the scores


def test_exact_scores_equal_explicit_per_sample_gradients():
    model = f64_model("lora")
    train, _ = batches(n_train=4)
    val = val_with_two_answers()
    config = ReweightConfig.from_dict(
        {"similarity": "exact", "val_balance": "answer", "shared_direction": "remove", "score": "cosine"}
    )
    v = validation_stats(model, collate(val, PAD), config, len(val), groups=answer_groups(val))
    result = reweighted_gradient(model, collate(train, PAD), v, config, len(train))
    params = adapter_parameters(model)

    def flat(f):
        g = per_sample_gradient(model, f, params)
        return torch.cat([g[n].flatten() for n in params]).double()

    rows_val = torch.stack([flat(f) for f in val])
    rows_train = torch.stack([flat(f) for f in train])
    direction = explicit_direction(rows_val, answer_groups(val), "answer", "remove")
    u_ref = rows_train @ direction / rows_train.norm(dim=1)
    torch.testing.assert_close(result.scores, u_ref, rtol=1e-8, atol=1e-12 * float(u_ref.abs().max()))
    # the validation loss gradient itself is unchanged by the options (it feeds val_step_every)
    expected = {n: sum(per_sample_gradient(model, f, params)[n] for f in val) / len(val) for n in params}
    for n in params:
        torch.testing.assert_close(v.grad[n], expected[n], rtol=1e-9, atol=1e-13)


def test_fresh_lora_with_options_falls_back_to_uniform_without_nan():

    model = ml.add_adapter(tiny_model("gpt2", dtype=torch.float64), ml.LoRAConfig(r=4))  # B = 0
    train, _ = batches()
    val = val_with_two_answers()
    config = ReweightConfig.from_dict(
        {"val_balance": "answer", "shared_direction": "remove", "score": "cosine"}
    )
    v = validation_stats(model, collate(val, PAD), config, len(val), groups=answer_groups(val))
    result = reweighted_gradient(model, collate(train, PAD), v, config, len(train))
    assert result.fallback and torch.isfinite(result.weights).all()
    torch.testing.assert_close(result.weights, torch.full((len(train),), 1 / len(train), dtype=torch.float64))


def test_options_need_per_sample_aggregation_and_known_values():
    with pytest.raises(ReweightConfigError, match=r"reweight\.direction\.aggregation"):
        ReweightConfig.from_dict({"val_balance": "answer", "val_aggregation": "mean"})
    with pytest.raises(ReweightConfigError, match=r"reweight\.direction\.balance"):
        ReweightConfig.from_dict({"val_balance": "label"})
    with pytest.raises(ReweightConfigError, match=r"reweight\.direction\.shared"):
        ReweightConfig.from_dict({"shared_direction": "drop"})
    with pytest.raises(ValueError, match="per_sample"):
        sim.similarity_scores({}, {}, "mean", torch.ones(1))
