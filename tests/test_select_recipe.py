"""A recipe's ``select:`` section: the data-selection baselines as training runs (``metalora.train.selection``).

Oracles: ``select_examples`` chooses what ``select_jsonl`` chooses from the same rows written as JSONL; a run's
recorded choice equals BM25's top-k computed by hand from ``bm25_scores`` over the pool and the target set,
and the target set is the reweighting validation set of the same seed (``draw_validation_set``); MIX at 10:1
with M = N/10 trains on every pool and target example.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train_run import _recipe

from metalora.compare.study import seed_overrides
from metalora.data import Example, build_pools, load_task, load_tasks
from metalora.select import bm25_scores, select_examples, select_jsonl, write_jsonl
from metalora.train import run
from metalora.train.config import RunConfig
from metalora.train.reweight_data import draw_validation_set, held_out_keys
from metalora.train.runner import RunConfigError, resolve_config

WORDS = (
    "the heart pumps blood kidney filters liver stores glycogen lung gas exchange nerve signal bone".split()
)


def _examples(n: int, task: str, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(" ".join(rng.choice(WORDS, 6)), " ".join(rng.choice(WORDS, 2)), task, f"{task}/train/{i}")
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("bm25", {"k": 7}),
        ("dsir", {"k": 7, "num_buckets": 64}),
        ("classifier", {"k": 7}),
        ("mix", {"ratio": 4}),
    ],
)
def test_select_examples_chooses_what_select_jsonl_chooses(tmp_path, method, kwargs):
    pool, target = _examples(30, "pool", 0), _examples(6, "val", 1)
    write_jsonl(
        [{"prompt": e.prompt, "response": e.response, "id": e.id} for e in pool], tmp_path / "c.jsonl"
    )
    write_jsonl(
        [{"prompt": e.prompt, "response": e.response, "id": e.id} for e in target], tmp_path / "t.jsonl"
    )
    select_jsonl(method, tmp_path / "c.jsonl", tmp_path / "t.jsonl", tmp_path / "out.jsonl", seed=3, **kwargs)
    expected = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    chosen, summary = select_examples(method, pool, target, seed=3, **kwargs)
    assert [e.id for e in chosen] == expected == summary["chosen_ids"]
    if method == "mix":  # 24 pool + 6 target examples at 4:1
        assert (summary["n_from_candidates"], summary["n_from_target"]) == (24, 6)


def _select_recipe(tmp_path, select: dict) -> dict:
    recipe = _recipe(tmp_path, "lora_mt")
    recipe["data"]["val_task"] = recipe["data"]["tasks"][1]
    recipe["select"] = select
    return recipe


def test_bm25_run_trains_on_the_top_k_against_the_reweighting_validation_set(tmp_path):
    recipe = _select_recipe(tmp_path, {"method": "bm25", "fraction": 0.25, "val_ratio": 10, "seed": 2})
    run_dir = run(recipe)
    data = json.loads((run_dir / "data.json").read_text())
    # oracle: the pool, the target set drawn as reweighting draws it (seed 2, M = 60 // 10), BM25 by hand
    tasks = load_tasks(recipe["data"]["tasks"], seed=0)
    pool = [e for exs in build_pools(tasks, 20, seed=0).values() for e in exs]
    val_task = load_task(recipe["data"]["val_task"], seed=0)
    target = draw_validation_set(val_task.dev, len(pool), 10, 2, exclude=held_out_keys(val_task.test))
    texts = [f"{e.prompt}\n{e.response}" for e in pool]
    scores = bm25_scores(texts, [f"{e.prompt}\n{e.response}" for e in target])
    top = [pool[i] for i in np.argsort(-scores, kind="stable")[:15]]
    assert data["selection"]["chosen_ids"] == [e.id for e in top] and data["selection"]["n_target"] == 6
    per_task = {t.name: sum(e.task == t.name for e in top) for t in tasks}
    assert data["train_examples"] == {name: n for name, n in per_task.items() if n}
    assert sum(per_task.values()) == 15


def test_mix_run_trains_on_the_pool_and_the_validation_set(tmp_path):
    recipe = _select_recipe(tmp_path, {"method": "mix", "mix_ratio": 10, "val_ratio": 10})
    recipe["data"]["val_task"] = {**recipe["data"]["tasks"][1], "name": "trusted"}  # a task not in data.tasks
    run_dir = run(recipe)
    data = json.loads((run_dir / "data.json").read_text())
    assert data["train_examples"] == {"task0": 20, "task1": 20, "task2": 20, "trusted": 6}
    assert data["task_to_id"]["trusted"] == 3
    assert (data["selection"]["n_from_candidates"], data["selection"]["n_from_target"]) == (60, 6)
    # a task-routed adapter has no head for the validation task
    recipe["adapter"] = {"type": "mtl_lora", "r": 4}
    with pytest.raises(RunConfigError, match="no head"):
        run(recipe, overrides=["name=routed"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"algorithm": "meta"}, "applies to algorithm=lora_mt"),
        ({"data_val_task": None}, "needs data.val_task"),
        ({"select": {"method": "bm25", "options": {"num_buckets": 8}}}, "takes no option"),
        ({"select": {"method": "classifier", "options": {"sampling": "pareto"}}}, "pareto"),
        ({"select": {"method": "mmr"}}, "select.method"),
        ({"select": {"fraction": 0}}, "select.fraction"),
    ],
)
def test_bad_select_sections_name_the_key(tmp_path, change, message):
    recipe = _select_recipe(tmp_path, {"method": "bm25"})
    if "data_val_task" in change:
        recipe["data"]["val_task"] = None
    recipe.update({k: v for k, v in change.items() if k != "data_val_task"})
    with pytest.raises(RunConfigError, match=message):
        resolve_config(recipe)


def test_select_section_round_trips_and_compare_varies_its_seed(tmp_path):
    recipe = _select_recipe(tmp_path, {"method": "dsir", "k": 5, "options": {"num_buckets": 128}})
    resolved = resolve_config(recipe)
    assert resolved["select"] == {
        "method": "dsir",
        "val_ratio": 10,
        "fraction": 0.25,
        "k": 5,
        "mix_ratio": 10.0,
        "seed": 0,
        "options": {"num_buckets": 128},
    }
    assert resolve_config(resolved) == resolved
    config = RunConfig.load(resolved)
    assert "select.seed=4" in seed_overrides(config, 4)
    assert "select.seed=4" not in seed_overrides(RunConfig.load(_recipe(tmp_path, "lora_mt")), 4)
