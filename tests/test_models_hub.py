"""Hub conventions (issue 17 item 1): ``HF_HUB_OFFLINE`` decides whether ``load_base`` may download,
``model_kwargs`` reach ``from_pretrained``, and ``trust_remote_code`` stays off unless a config sets it.

Oracles: the loaded model's own config (its attention implementation), the one-line error naming the
offline setting, and the resolved config's keys."""

from __future__ import annotations

import pytest
from test_train_run import _recipe

from metalora.models import ModelNotFoundError, hub_offline, load_base
from metalora.train.config import RunConfig, RunConfigError
from metalora.train.runner import load_model


@pytest.mark.parametrize(
    "value, offline", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)]
)
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_offline_and_not_cached_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotFoundError, match=r"'nobody/no-such-model'.*offline: HF_HUB_OFFLINE is set"
    ) as err:
        load_base("nobody/no-such-model")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_model_kwargs_reach_from_pretrained(tmp_path, impl):
    recipe = _recipe(tmp_path, "lora_mt")
    config = RunConfig.from_dict(recipe, [f"model_kwargs.attn_implementation={impl}"])
    model, _ = load_model(config)
    assert model.config._attn_implementation == impl
    assert load_base(tmp_path / "base", attn_implementation=impl)[0].config._attn_implementation == impl


def test_trust_remote_code_is_off_unless_set_and_model_kwargs_are_checked(tmp_path):
    recipe = _recipe(tmp_path, "lora_mt")
    config = RunConfig.from_dict(recipe)
    assert config.trust_remote_code is False and config.to_dict()["trust_remote_code"] is False
    assert RunConfig.from_dict(recipe, ["trust_remote_code=true"]).trust_remote_code is True
    with pytest.raises(RunConfigError, match=r"model_kwargs: unknown key\(s\) \['dtype'\].*top-level dtype"):
        RunConfig.from_dict(recipe, ["model_kwargs.dtype=bf16"])
    with pytest.raises(RunConfigError, match=r"trust_remote_code='yes': expected true or false"):
        RunConfig.from_dict(recipe, ["trust_remote_code='yes'"])
