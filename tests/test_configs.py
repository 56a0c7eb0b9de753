"""Every recipe in configs/ resolves, validates, and names a buildable adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalora.adapters.api import config_from_dict
from metalora.train.runner import ALGORITHMS, resolve_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
EXPECTED = {
    "meta_lora",
    "reweight",
    "mtl_lora",
    "lora_mt",
    "lora_st",
    "hydra_lora",
    "multilora",
    "moelora",
    "dora",
}


def test_there_is_one_recipe_per_method():
    assert EXPECTED <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_resolves_and_builds_its_adapter_config(path):
    cfg = resolve_config(path, overrides=["data.tasks=[arc_easy,boolq]"])
    assert cfg["name"] == path.stem
    assert cfg["algorithm"] in ALGORITHMS
    adapter = dict(cfg["adapter"])
    kind = adapter.pop("type")
    if kind in ("mtl_lora", "moelora"):
        adapter["task_names"] = cfg["data"]["tasks"]
    built = config_from_dict(kind, adapter)
    assert built.adapter_type == kind


STUDY_RECIPES = sorted(
    p
    for p in (Path(__file__).resolve().parent.parent / "configs" / "studies").glob("*/*.yaml")
    if p.stem != "eval_tasks"
)


@pytest.mark.parametrize("path", STUDY_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_study_recipe_resolves_as_written(path):
    """A study's recipe resolves without overrides, under its file's name, and round-trips."""
    cfg = resolve_config(path)
    assert cfg["name"] == path.stem and cfg["algorithm"] in ALGORITHMS
    assert resolve_config(cfg) == cfg
