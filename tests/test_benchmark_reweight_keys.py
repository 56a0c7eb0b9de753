"""The reweighting benchmarks' result keys: built from each experiment's config, they still name every
result stored in ``benchmarks/results/reweight.json`` (except those run with an explicit ``--*-name``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
STORED = json.loads((BENCHMARKS / "results" / "reweight.json").read_text())
NAMED = {  # run with --d-name / --c-name / --probe-name
    "d_table2_sst2_reweight_val8",
    "c_noisy_labels_text_sst2_2epochs_lr2e-4",
    "c_probe_sst2_warm40_layer_cosine",
}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiments() -> dict[str, ModuleType]:
    return {
        "c_noisy_labels": load("reweight_noisy_labels"),
        "c_probe": load("reweight_probe"),
        "d_table2": load("reweight_table2"),
    }


def test_every_stored_result_key_is_rebuilt_from_its_config(experiments):
    checked = 0
    for key, result in STORED.items():
        prefix = next((p for p in experiments if key.startswith(p)), None)
        if prefix is None or key in NAMED:
            continue
        assert experiments[prefix].result_key(result) == key
        checked += 1
    assert checked == len([k for k in STORED if k.startswith(tuple(experiments))]) - len(NAMED) == 18


def test_the_documented_command_gives_the_stored_key_and_config(experiments):
    noisy = experiments["c_noisy_labels"]
    common = load("reweight_common")
    parser = argparse.ArgumentParser()
    common.add_shared_arguments(parser)
    noisy.add_arguments(parser)
    args = parser.parse_args(
        "--c-task sst2 --mc-style text --steps 20 --lr 2e-4 --c-warm-steps 40 --c-epochs 2 --c-val-batch 8 "
        "--score layer_cosine --val-balance answer --shared-direction remove".split()
    )
    key = "c_noisy_labels_text_layer_cosine_sst2_balanced_unshared_2epochs_val8_warm40"
    stored = {k: v for k, v in STORED[key].items() if k != "rows"}
    assert noisy.config(args) == stored
    assert noisy.result_key(noisy.config(args)) == key
