"""``metalora compare`` end to end on two tiny recipes: every recipe × seed trained and scored on the same
held-out items, a rate chosen on dev, intervals and the paired bootstrap, resumable.

Oracles: each run's scores recomputed by hand from its adapter (``evaluate_tasks``), the intervals from
scipy's ``t.interval``, the bootstrap from ``paired_bootstrap`` on the stored per-item scores, the chosen
rate from the tuning runs' dev scores, and no retraining on a second call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats as scipy_stats
from test_train_run import _tiny_base

from metalora.cli import main
from metalora.data import load_task
from metalora.eval.tasks import evaluate_tasks
from metalora.rundir import load_adapted
from metalora.stats import paired_bootstrap


def _mc_tasks(path: Path) -> list[dict]:
    specs = []
    for t in range(2):
        rows = [
            {
                "id": f"{t}-{i}",
                "q": f"w{t} w{i % 20}",
                "choices": [f"w{20 + i % 7}", f"w{30 + i % 5}", "w9"],
                "label": i % 3,
            }
            for i in range(60)
        ]
        file = path / f"mc{t}.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs.append(
            {"name": f"mc{t}", "path": str(file), "prompt_field": "q", "options_field": "choices",
             "answer_field": "label", "id_field": "id", "response_field": None}
        )  # fmt: skip
    return specs


def _recipes(tmp_path: Path) -> list[Path]:
    _tiny_base(tmp_path / "base")
    data = {"tasks": _mc_tasks(tmp_path), "examples_per_task": 20, "max_length": 24}
    common = {"algorithm": "lora_mt", "model": str(tmp_path / "base"), "data": data}
    common |= {"multitask": {"batch_size": 8}, "train": {"max_steps": 3, "lr": 1e-2, "progress": False}}
    paths = []
    for name, adapter in (("lora", {"type": "lora", "r": 4}), ("mtl", {"type": "mtl_lora", "r": 4})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**common, "adapter": adapter}))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_compare_two_recipes_end_to_end(tmp_path, capsys):
    lora, mtl = _recipes(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", str(lora), str(mtl), "--seeds", "0,1", "--out", str(out), "--reference", "lora"]
    argv += ["--lr-grid", "1e-2,1e-3", "--resamples", "2000", "train.max_steps=2"]
    assert main(argv) == 0
    report = json.loads((out / "compare.json").read_text())
    summary = report["summary"]
    assert set(summary["recipes"]) == {"lora", "mtl"} and report["study"]["seeds"] == [0, 1]

    # the rate: the better dev score of the two tuning runs, and every seed ran with it
    tune = json.loads((out / "tune.json").read_text())
    for recipe in ("lora", "mtl"):
        runs = [r for r in tune["runs"] if r["recipe"] == recipe]
        best = max(runs, key=lambda r: np.mean([s[s["primary"]] for s in r["scores"].values()]))
        assert tune["chosen"][recipe]["lr"] == best["lr"] == summary["recipes"][recipe]["lr"]
        for seed in (0, 1):
            cfg = yaml.safe_load((out / "runs" / f"{recipe}-s{seed}" / "config.yaml").read_text())
            assert (
                cfg["train"]["lr"] == best["lr"] and cfg["train"]["seed"] == seed and cfg["data"]["seed"] == 0
            )

    # every seed's score, recomputed from its adapter
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert set(results) == {"lora-s0", "lora-s1", "mtl-s0", "mtl-s1"}
    specs = yaml.safe_load(lora.read_text())["data"]["tasks"]
    tasks = [load_task(s, seed=0) for s in specs]
    for key in ("lora-s1", "mtl-s0"):
        model = load_adapted(out / "runs" / key)
        with torch.no_grad():
            expected = evaluate_tasks(model, _tok(tmp_path), tasks, split="test", progress=False)
        for task in ("mc0", "mc1"):
            assert results[key]["scores"][task]["acc"] == expected[task]["acc"]
    # the same items everywhere; seeds differ in training
    ids = {k: [r["scores"][t]["items"]["ids"] for t in ("mc0", "mc1")] for k, r in results.items()}
    assert len({json.dumps(v) for v in ids.values()}) == 1
    a0 = (out / "runs" / "lora-s0" / "adapter" / "adapter.safetensors").read_bytes()
    assert a0 != (out / "runs" / "lora-s1" / "adapter" / "adapter.safetensors").read_bytes()

    # intervals: scipy's t interval over the seeds' macro scores
    for recipe in ("lora", "mtl"):
        row = summary["recipes"][recipe]
        macro = [
            np.mean([results[f"{recipe}-s{s}"]["scores"][t]["acc"] for t in ("mc0", "mc1")]) for s in (0, 1)
        ]
        assert row["macro"]["per_seed"] == pytest.approx(macro, abs=1e-12)
        if np.std(macro) > 0:
            low, high = scipy_stats.t.interval(0.95, 1, loc=np.mean(macro), scale=scipy_stats.sem(macro))
            assert (row["macro"]["low"], row["macro"]["high"]) == pytest.approx((low, high), abs=1e-12)
    # the bootstrap: items averaged over seeds, paired with the reference's
    items = {
        r: {t: np.mean([results[f"{r}-s{s}"]["scores"][t]["items"]["acc"] for s in (0, 1)], axis=0).tolist() for t in ("mc0", "mc1")}
        for r in ("lora", "mtl")
    }  # fmt: skip
    boot = paired_bootstrap(items["mtl"], items["lora"], resamples=2000)
    assert summary["versus_reference"]["mtl"] == pytest.approx(boot.__dict__)

    assert "| lora |" in (out / "compare.md").read_text()
    for png in ("scores.png", "losses.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"

    # a second call reuses every finished run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("counters.json")}
    capsys.readouterr()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("counters.json")} == stamps


def _tok(tmp_path: Path):
    from metalora.models import load_base

    return load_base(tmp_path / "base")[1]


def test_compare_refuses_an_unknown_reference(tmp_path, capsys):
    lora, _ = _recipes(tmp_path)
    assert main(["compare", str(lora), "--reference", "nope", "--out", str(tmp_path / "c")]) == 2
    assert "--reference 'nope' is not one of the recipes ['lora']" in capsys.readouterr().err


def test_a_stored_run_made_with_other_settings_is_not_reused(tmp_path):
    """Oracle: the second study differs only in an override; reusing the first's result would report
    numbers of another configuration, so it stops naming the file."""
    from metalora.compare import Study, run_study

    lora, _ = _recipes(tmp_path)
    run_study(Study([str(lora)], tmp_path / "c", seeds=[0], overrides=["train.max_steps=1"], limit=2))
    with pytest.raises(ValueError, match=r"lora-s0\.json was made with other settings"):
        run_study(Study([str(lora)], tmp_path / "c", seeds=[0], overrides=["train.max_steps=2"], limit=2))


def test_base_row_scores_the_untrained_model_on_the_same_items(tmp_path):
    """``--base``: the base model's scores equal ``evaluate_tasks`` on the untrained model (the oracle),
    on the same items as the recipe's runs; it has no parameters or cost, and can be the reference."""
    lora, _ = _recipes(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", str(lora), "--seeds", "0", "--out", str(out), "--base", "--reference", "base"]
    assert main([*argv, "--limit", "12", "--resamples", "200", "train.max_steps=1"]) == 0
    base = json.loads((out / "results" / "base.json").read_text())
    run = json.loads((out / "results" / "lora-s0.json").read_text())
    tasks = [load_task(s, seed=0) for s in yaml.safe_load(lora.read_text())["data"]["tasks"]]
    from metalora.models import load_base

    model, tok = load_base(tmp_path / "base")
    with torch.no_grad():
        expected = evaluate_tasks(model.eval(), tok, tasks, split="test", limit=12, progress=False)
    for task in ("mc0", "mc1"):
        assert base["scores"][task]["acc"] == expected[task]["acc"]
        assert base["scores"][task]["items"]["ids"] == run["scores"][task]["items"]["ids"]
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert summary["recipes"]["base"]["trainable_params"] == 0
    assert set(summary["versus_reference"]) == {"lora"}
    assert "| base | 1 | - |" in (out / "compare.md").read_text()


def test_base_row_needs_one_base_model(tmp_path, capsys):
    lora, _ = _recipes(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(
        yaml.safe_dump({**yaml.safe_load(lora.read_text()), "model": str(tmp_path / "elsewhere")})
    )
    assert main(["compare", str(lora), str(other), "--base", "--out", str(tmp_path / "c")]) == 2
    assert "--base needs one base model" in capsys.readouterr().err


def test_recipe_variants_are_rows_of_their_own(tmp_path):
    """``a.yaml@key=value``: the recipe with that override, a row named ``a@key=value``. Oracle: the run's
    resolved config holds the variant's value (and the shared override), the plain recipe's does not, and
    an item with ``=`` that is not a YAML file stays an override."""
    from metalora.compare.study import is_recipe, recipe_name, recipe_parts

    lora, _ = _recipes(tmp_path)
    variant = f"{lora}@multitask.batch_size=4@train.lr=0.003"
    assert recipe_parts(variant) == (str(lora), ["multitask.batch_size=4", "train.lr=0.003"])
    assert recipe_name(variant) == "lora@multitask.batch_size=4@train.lr=0.003"
    assert is_recipe(variant) and is_recipe(str(lora)) and not is_recipe("train.max_steps=1")
    with pytest.raises(ValueError, match="expected key=value"):
        recipe_parts(f"{lora}@nonsense")
    out = tmp_path / "cmp"
    argv = ["compare", str(lora), variant, "--seeds", "0", "--out", str(out), "--limit", "4"]
    assert main([*argv, "--reference", "lora", "--resamples", "100", "train.max_steps=1"]) == 0
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert set(summary["recipes"]) == {"lora", "lora@multitask.batch_size=4@train.lr=0.003"}
    plain = yaml.safe_load((out / "runs" / "lora-s0" / "config.yaml").read_text())
    varied = yaml.safe_load(
        (out / "runs" / "lora@multitask.batch_size=4@train.lr=0.003-s0" / "config.yaml").read_text()
    )
    assert (varied["multitask"]["batch_size"], varied["train"]["lr"]) == (4, 0.003)
    assert (plain["multitask"]["batch_size"], plain["train"]["lr"]) == (8, 1e-2)
    assert varied["train"]["max_steps"] == plain["train"]["max_steps"] == 1
