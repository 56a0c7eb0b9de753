"""``RunConfig``: typed sections, overrides typed from the annotations, a lossless dict round trip, and
every shipped recipe resolving unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metalora.train.config import ALGORITHMS, RunConfig, RunConfigError
from metalora.train.engine import EngineConfig
from metalora.train.runner import ALGORITHM_RUNNERS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = ["data.tasks=[arc_easy,boolq]"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_round_trips(path):
    """Oracle: from_dict(to_dict(c)) == c, and the dict survives YAML (what config.yaml stores)."""
    config = RunConfig.from_yaml(path, TASKS)
    data = config.to_dict()
    assert RunConfig.from_dict(data) == config
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(data))) == config
    assert config.name == (yaml.safe_load(path.read_text()).get("name") or path.stem)


def test_non_default_values_survive_the_round_trip():
    config = RunConfig.from_dict(
        {
            "name": "x",
            "algorithm": "reweight",
            "data": {"tasks": ["sst2", {"name": "mine", "path": "f.jsonl"}], "val_task": "sst2", "seed": 3},
            "adapter": {"type": "mtl_lora", "r": 4, "num_up": 2},
            "train": {"betas": [0.9, 0.95], "max_grad_norm": 1.0, "lr": "5e-4", "precision": "bf16"},
            "multitask": {"protocol": "few_shot", "epochs": 2.5},
            "meta": {"sta": True, "inner_lr": 1e-3},
        }
    )
    assert config.train.betas == (0.9, 0.95) and config.train.lr == 5e-4  # YAML 1.1's "5e-4" string
    assert config.adapter["task_names"] == ["sst2", "mine"]  # task-routed: the data tasks by default
    again = RunConfig.from_dict(config.to_dict())
    assert again == config and again.reweight == config.reweight and again.meta.sta is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=ten", r"train.max_steps='ten': expected an integer"),
        ("train.lr=fast", r"train.lr='fast': expected a finite number"),
        ("train.progress=maybe", r"train.progress='maybe': expected true or false"),
        ("train.betas=[0.9]", r"train.betas=\[0.9\]: expected 2 values"),
        ("algorithm=maml", r"algorithm='maml': expected one of \['meta', 'lora_mt', 'lora_st', 'reweight'\]"),
        ("multitask.protocol=paper", r"multitask.protocol='paper'"),
        ("data.examples_per_task=1.5", r"data.examples_per_task=1.5: expected an integer"),
        ("meta.nope=1", r"meta: unknown key\(s\) \['nope'\]"),
        ("nope.x=1", r"unknown key 'nope'"),
        ("name.x=1", r"'name' is not a config section"),
        ("adapter.type=vera", r"adapter.type='vera'"),
        ("train.lr", r"expected key=value"),
    ],
)
def test_overrides_are_typed_from_the_annotations(override, message):
    with pytest.raises(RunConfigError, match=message):
        RunConfig.from_yaml(CONFIGS / "lora_mt.yaml", [*TASKS, override])


def test_overrides_coerce_and_reach_nested_sections():
    config = RunConfig.from_yaml(
        CONFIGS / "meta_lora.yaml",
        [*TASKS, "train.lr=1e-4", "train.max_grad_norm=null", "adapter.r=4", "meta.support_size=2"],
    )
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.train.max_grad_norm is None and config.adapter["r"] == 4 and config.meta.support_size == 2
    assert config.adapter["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_sections_are_the_algorithm_dataclasses_and_every_algorithm_has_a_runner():
    config = RunConfig.from_yaml(CONFIGS / "lora_mt.yaml", TASKS)
    assert isinstance(config.train, EngineConfig)
    assert set(ALGORITHM_RUNNERS) == set(ALGORITHMS)


def test_missing_tasks_and_bad_files_name_the_problem(tmp_path):
    with pytest.raises(RunConfigError, match="data.tasks is empty"):
        RunConfig.from_dict({"algorithm": "meta"})
    with pytest.raises(RunConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RunConfigError, match="top level must be a mapping"):
        RunConfig.from_yaml(tmp_path / "list.yaml")
