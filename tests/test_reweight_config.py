"""The nested ``reweight:`` section: old flat keys as aliases, the dict round trip, clear errors."""

from __future__ import annotations

import pytest
import torch
from test_reweight import batches, f64_model, run_step

from metalora.train.reweight import ReweightConfig, ReweightConfigError
from metalora.train.reweight_config import ALIASES

NON_DEFAULT = {
    "similarity": "dense",
    "modules": "attention",
    "positions": "nonpad",
    "val_aggregation": "mean",
    "val_balance": "answer",
    "shared_direction": "remove",
    "score": "cosine",
    "negative": "shift",
    "fallback": "zero",
    "delta": 1e-20,
    "unweighted_first_step": True,
    "val_step_every": 10,
    "val_refresh_every": 10,
}


def nested(alias: str, value: object) -> dict:
    section, key = ALIASES[alias]
    return {section: {key: value}}


def test_every_old_key_has_a_non_default_value_here():
    assert set(NON_DEFAULT) == set(ALIASES)


@pytest.mark.parametrize("alias", sorted(NON_DEFAULT))
def test_old_flat_key_maps_to_its_nested_place_with_a_warning(alias):
    value = NON_DEFAULT[alias]
    section, key = ALIASES[alias]
    with pytest.warns(FutureWarning, match=rf"reweight\.{alias} is now reweight\.{section}\.{key}"):
        old = ReweightConfig.from_dict({alias: value})
    new = ReweightConfig.from_dict(nested(alias, value))
    assert old == new != ReweightConfig()
    assert getattr(getattr(old, section), key) == value


@pytest.mark.parametrize(
    "alias", ["similarity", "val_aggregation", "score", "negative", "delta", "positions"]
)
def test_old_flat_key_gives_the_same_weights_as_the_nested_key(alias):
    value = NON_DEFAULT[alias] if alias != "delta" else 1e3  # a δ large enough to change w
    train, val = batches()
    with pytest.warns(FutureWarning):
        old, g_old = run_step(f64_model(), train, val, ReweightConfig.from_dict({alias: value}))
    new, g_new = run_step(f64_model(), train, val, ReweightConfig.from_dict(nested(alias, value)))
    plain, _ = run_step(f64_model(), train, val, ReweightConfig())
    assert torch.equal(old.weights, new.weights) and torch.equal(old.scores, new.scores)
    assert all(torch.equal(g_old[n], g_new[n]) for n in g_new)
    assert not torch.equal(new.weights, plain.weights)  # the option does something here


def test_round_trip_keeps_every_non_default_value():
    config = ReweightConfig.from_dict(
        {
            "batch_size": 12,
            "val_ratio": 5,
            "val_batch_size": 3,
            "scheme": "two_backward",
            "seed": 7,
            "log_weights": False,
            "group_by_length": True,
            "stats": {"similarity": "exact", "modules": "mlp", "positions": "all"},
            "direction": {
                "aggregation": "per_sample",
                "balance": "answer",
                "shared": "remove",
                "score": "layer_cosine",
            },
            "weights": {"negative": "shift", "fallback": "zero", "no_signal": "fallback", "delta": 1e-12},
            "published_code": {"unweighted_first_step": True, "val_step_every": 10, "val_refresh_every": 10},
        }
    )
    data = config.to_dict()
    assert set(data["stats"]) == {"similarity", "modules", "positions"}
    assert ReweightConfig.from_dict(data) == config
    defaults = ReweightConfig().to_dict()
    for key, value in data.items():  # every field differs from its default
        if isinstance(value, dict):
            assert all(v != defaults[key][k] for k, v in value.items() if k != "aggregation"), key
        else:
            assert value != defaults[key], key
    assert ReweightConfig.from_dict(ReweightConfig().to_dict()) == ReweightConfig()


def test_unknown_keys_are_named_with_the_known_ones():
    with pytest.raises(
        ReweightConfigError,
        match=r"reweight\.simlarity: unknown key; known: \['batch_size', 'direction'.*'stats'.*old flat keys",
    ):
        ReweightConfig.from_dict({"simlarity": "dense"})
    with pytest.raises(ReweightConfigError, match=r"reweight\.stats\.score: unknown key; known: \['modules'"):
        ReweightConfig.from_dict({"stats": {"score": "dot"}})
    with pytest.raises(ReweightConfigError, match=r"reweight\.weights: expected a mapping"):
        ReweightConfig.from_dict({"weights": "clip"})


def test_values_are_validated_naming_the_nested_key_and_the_choices():
    with pytest.raises(
        ReweightConfigError, match=r"reweight\.weights\.negative='drop': expected one of \('clip', 'shift'\)"
    ):
        ReweightConfig.from_dict({"weights": {"negative": "drop"}})
    with pytest.raises(ReweightConfigError, match=r"reweight\.published_code\.val_refresh_every=0"):
        ReweightConfig.from_dict({"published_code": {"val_refresh_every": 0}})
    with pytest.raises(ReweightConfigError, match=r"reweight\.scheme='fast'"):
        ReweightConfig.from_dict({"scheme": "fast"})


def test_the_later_of_an_old_key_and_its_nested_key_wins():
    """An old-key override (``reweight.score=cosine``) added after a nested recipe's keys takes effect."""
    with pytest.warns(FutureWarning, match=r"reweight\.score is now reweight\.direction\.score"):
        old_later = ReweightConfig.from_dict({"direction": {"score": "dot"}, "score": "cosine"})
        nested_later = ReweightConfig.from_dict({"score": "cosine", "direction": {"score": "dot"}})
    assert old_later.direction.score == "cosine" and nested_later.direction.score == "dot"


def test_yaml_strings_in_float_fields_become_floats():
    config = ReweightConfig.from_dict({"weights": {"delta": "1e-4"}})
    assert config.weights.delta == 1e-4 and isinstance(config.weights.delta, float)
    with pytest.warns(FutureWarning):
        assert ReweightConfig.from_dict({"delta": "2e-3"}).weights.delta == 2e-3
    with pytest.raises(
        ReweightConfigError, match=r"reweight\.weights\.delta='small': expected a finite number"
    ):
        ReweightConfig.from_dict({"weights": {"delta": "small"}})
    with pytest.raises(ReweightConfigError, match=r"reweight\.batch_size='8'"):  # int fields are not coerced
        ReweightConfig.from_dict({"batch_size": "8"})
