"""Length-grouped batching (``multitask.group_by_length``) against hand-computed batches and the full batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train_engine import run_mt
from test_train_utils import adapter_state, max_abs_diff

from metalora.train import MultitaskConfig
from metalora.train.batching import MEGABATCH_FACTOR, length_grouped_order, padded_tokens
from metalora.train.multitask import EpochBatches, MultitaskConfigError


def features(lengths):
    return [{"i": i, "input_ids": [1] * n} for i, n in enumerate(lengths)]


def test_one_megabatch_is_cut_into_batches_of_neighbouring_lengths_by_hand():
    """Lengths 1..16, batch 4, all in one mega-batch: the batches must be exactly {16..13}, {12..9},
    {8..5}, {4..1} in some order; each pads 0+1+2+3 = 6 tokens, 24 in all (hand count), while the plain
    shuffle of the same seed pads more."""
    lengths = list(range(1, 17))
    grouped = EpochBatches(features(lengths), 4, seed=0, group_by_length=True)
    batches = [grouped.sample() for _ in range(4)]
    got = sorted(sorted(f["i"] + 1 for f in b) for b in batches)
    assert got == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert padded_tokens(batches) - sum(lengths) == 24
    plain = EpochBatches(features(lengths), 4, seed=0)
    assert padded_tokens([plain.sample() for _ in range(4)]) - sum(lengths) > 24


def test_every_epoch_covers_every_sample_once_and_mixes_across_megabatches():
    """Grouping keeps the epoch's sample set (every index once per epoch), and each mega-batch holds
    the same indices as the plain permutation's slice of the same seed."""
    rng = np.random.default_rng(1)
    n, batch = 3 * MEGABATCH_FACTOR * 2 + 5, 2  # three mega-batches, the last one partial
    lengths = rng.integers(1, 50, n).tolist()
    order = np.random.default_rng(7).permutation(n).tolist()
    grouped = length_grouped_order(order, lengths, batch, np.random.default_rng(7))
    assert sorted(grouped) == list(range(n))
    mega = MEGABATCH_FACTOR * batch
    for start in range(0, n, mega):
        assert set(grouped[start : start + mega]) == set(order[start : start + mega])
    b = EpochBatches(features(lengths), batch, seed=5, group_by_length=True)
    seen = [f["i"] for _ in range(n) for f in b.sample()]  # 2n samples: exactly two epochs
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))


def test_grouped_batches_resume_exactly_and_refuse_a_plain_state():
    lengths = [3, 9, 1, 7, 4, 4, 8, 2, 6, 5, 10]
    a = EpochBatches(features(lengths), 3, seed=2, group_by_length=True)
    expected = [[f["i"] for f in a.sample()] for _ in range(8)]
    b = EpochBatches(features(lengths), 3, seed=2, group_by_length=True)
    b.sample(), b.sample(), b.sample()
    c = EpochBatches(features(lengths), 3, seed=2, group_by_length=True)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [[f["i"] for f in c.sample()] for _ in range(5)] == expected[3:]
    plain = EpochBatches(features(lengths), 3, seed=2)
    with pytest.raises(MultitaskConfigError, match="group_by_length"):
        plain.load_state_dict(b.state_dict())


def test_sorted_micro_batches_give_the_full_batch_update(tmp_path):
    """With grouping, each rank's share is sorted by length before it is cut into micro-batches; the
    update must still equal the one-micro-batch update of the same batches (float64, 1e-10). Grouping
    itself changes the batches, so its run differs from the plain shuffle's."""
    grouped = MultitaskConfig(batch_size=6, group_by_length=True)
    full, _ = run_mt(tmp_path / "a", grouped, dtype=torch.float64)
    micro = MultitaskConfig(batch_size=6, micro_batch_size=2, group_by_length=True)
    accumulated, _ = run_mt(tmp_path / "b", micro, dtype=torch.float64)
    assert max_abs_diff(adapter_state(full), adapter_state(accumulated)) < 1e-10
    plain, _ = run_mt(tmp_path / "c", MultitaskConfig(batch_size=6), dtype=torch.float64)
    assert max_abs_diff(adapter_state(full), adapter_state(plain)) > 1e-6


def test_reweighting_groups_its_training_batches_when_asked(tmp_path):
    """``reweight.group_by_length``: the training batches a run records are ``EpochBatches``' grouped ones of
    the same seed (so every sample once per epoch, the grouping tested above), not the plain shuffle's."""
    from test_train_utils import PAD, make_features

    import metalora as ml
    from metalora.testing import tiny_model
    from metalora.train import EngineConfig
    from metalora.train.reweight import ReweightConfig, train_reweight

    train = make_features("tr", 0, 12, length=12, seed=5, vary=True)
    val = make_features("va", 0, 4, length=8, seed=6)
    recorded = {}
    for grouped in (False, True):
        config = ReweightConfig.from_dict({"batch_size": 3, "seed": 4, "group_by_length": grouped})
        run_dir = tmp_path / f"g{int(grouped)}"
        model = ml.add_adapter(tiny_model(), ml.LoRAConfig(r=2))
        train_reweight(model, train, val, config, EngineConfig(max_steps=4, progress=False), run_dir, PAD)
        lines = (run_dir / "weights.jsonl").read_text().splitlines()
        recorded[grouped] = [json.loads(line)["sample_ids"] for line in lines]
        order = EpochBatches(train, 3, seed=4, group_by_length=grouped)
        assert recorded[grouped] == [[f["sample_id"] for f in order.sample()] for _ in range(4)]
    assert recorded[True] != recorded[False]
    assert sorted(i for b in recorded[True] for i in b) == sorted(f["sample_id"] for f in train)
