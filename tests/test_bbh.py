"""BBH on the real BIG-bench task files with lm-eval's 3-shot exemplars (``metalora.data.bbh``).

The dev install unpacks the BBH task files into metalora's cache (``python -m metalora.data.fetch_bbh``), so CI
runs these; elsewhere they skip and say how to get the data. They are core tests (not ``optional``): with
CI=true a skip fails (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_eval_lm import model, reference_loglikelihood, tok  # noqa: F401

from metalora.data import bbh, load_task
from metalora.eval.tasks import default_shots, evaluate_tasks, mc_style, mc_view

pytestmark = pytest.mark.skipif(
    not (bbh.cache_root() / ".complete").is_file() or bbh.lm_eval_fewshot("date_understanding") is None,
    reason="BBH task files or lm-eval not installed: run `python -m metalora.data.fetch_bbh` and pip install lm-eval",
)

# hand-typed: lm-eval's bbh_fewshot_date_understanding context for BIG-bench's first date item
DATE_CONTEXT = (
    "Infer the date from context.\n\n"
    "Q: Today is Christmas Eve of 1937. What is the date 10 days ago in MM/DD/YYYY?\nOptions:\n(A) 12/14/2026\n"
    "(B) 12/14/1950\n(C) 12/14/2007\n(D) 12/14/1937\n(E) 07/14/1938\n(F) 12/14/1988\nA: (D)\n\n"
    "Q: Tomorrow is 11/12/2019. What is the date one year ago from today in MM/DD/YYYY?\nOptions:\n"
    "(A) 09/04/2018\n(B) 11/11/2018\n(C) 08/25/2018\n(D) 11/02/2018\n(E) 11/04/2018\nA: (B)\n\n"
    "Q: Jane and John married on Jan 2, 1958. It is their 5-year anniversary today. What is the date tomorrow "
    "in MM/DD/YYYY?\nOptions:\n(A) 01/11/1961\n(B) 01/03/1963\n(C) 01/18/1961\n(D) 10/14/1960\n(E) 01/03/1982\n"
    "(F) 12/03/1960\nA: (B)\n\n"
    "Q: Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?\nOptions:\n(A) 05/01/2021\n"
    "(B) 02/23/2021\n(C) 03/11/2021\n(D) 05/09/2021\n(E) 06/12/2021\n(F) 04/29/2021\nA:"
)


def test_letter_task_uses_lm_evals_three_exemplars_in_order():
    task = load_task("bbh:date_understanding")
    assert default_shots(task) == 3 and task.sizes() == {"train": 0, "dev": 3, "test": 369}
    first = task.test[0]
    assert first.options == ["(A)", "(B)", "(C)", "(D)", "(E)", "(F)"]
    assert first.answer == 0  # the day after April 30, 2021 is 05/01/2021, option (A)
    assert [d.response for d in task.dev] == [" (D)", " (B)", " (B)"]


def test_word_tasks_map_bigbench_choices_to_bbh_answers():
    nav = load_task("bbh:navigate")
    raw = json.loads(bbh.task_file("navigate").read_text())["examples"]
    for ex, row in zip(nav.test[:20], raw[:20], strict=True):
        truth = max(row["target_scores"], key=row["target_scores"].get)
        assert ex.options == ["Yes", "No"] and ex.options[ex.answer] == {"True": "Yes", "False": "No"}[truth]
    sports = load_task("bbh:sports_understanding")
    assert sports.test[0].options == ["yes", "no"] and [d.response for d in sports.dev] == [
        " yes",
        " no",
        " yes",
    ]


def test_free_form_task_takes_the_digit_target_like_the_exemplars():
    task = load_task("bbh:object_counting")
    assert task.meta["kind"] == "gen" and task.test[0].response == " 3"  # BIG-bench lists ["three", "3"]
    assert [d.response for d in task.dev] == [" 6", " 11", " 8"]


def lm_eval_context(task: str, question: str) -> str:
    """lm-eval's own rendering of BBH's 3-shot context for ``question``: its ``bbh/fewshot/<task>.yaml``
    (description, ``first_n`` exemplars, ``Q: {{input}}\nA:``) built into a ``ConfigurableTask`` over an
    in-memory one-document dataset, then ``fewshot_context(doc, 3)``."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    folder = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks/bbh/fewshot"
    config = yaml.safe_load((folder / "_fewshot_template_yaml").read_text())
    config |= yaml.safe_load((folder / f"{task}.yaml").read_text())
    config.pop("include", None)
    doc = {"input": question, "target": ""}
    config.update(
        task=f"bbh_fewshot_{task}", custom_dataset=lambda **_: {"test": datasets.Dataset.from_list([doc])}
    )
    return ConfigurableTask(config=config).fewshot_context(doc, num_fewshot=3)


def test_eval_scores_lm_evals_3_shot_context(model, tok, monkeypatch):  # noqa: F811
    """Oracle: the contexts and continuations ``evaluate_tasks`` scores (captured at ``encode_pair``) are,
    for every item, lm-eval's own rendering (``lm_eval_context``: description, the 3 exemplars in order,
    then the item) and, for the first item, the hand-typed ``DATE_CONTEXT``; acc then equals the argmax
    of float64 reference log-likelihoods of those contexts.

    Shown to fail on a 0-shot context (planted: ``default_shots`` returning 0), on the exemplars in
    reverse order, and without the description: the old accuracy-over-3-items check passed all three."""
    import metalora.eval.multiple_choice as mc

    task = load_task("bbh:date_understanding")
    task.test = task.test[:3]
    scored: list[tuple[str, str]] = []
    encode = mc.encode_pair
    monkeypatch.setattr(
        mc, "encode_pair", lambda tk, ctx, cont, *a: scored.append((ctx, cont)) or encode(tk, ctx, cont, *a)
    )
    got = evaluate_tasks(model, tok, [task], progress=False)["bbh:date_understanding"]
    assert got["primary"] == "acc" and mc_style(task) == "text" and got["n"] == 3
    per_item = []
    for ex in task.test:
        assert ex.prompt.startswith("Q: ") and ex.prompt.endswith("\nA:")
        context = lm_eval_context("date_understanding", ex.prompt[len("Q: ") : -len("\nA:")])
        per_item.append([(context, " " + o) for o in mc_view(ex, "text").options])
    assert scored == [pair for pairs in per_item for pair in pairs]
    assert scored[0][0] == DATE_CONTEXT
    correct = 0
    for ex, pairs in zip(task.test, per_item, strict=True):
        lls = [reference_loglikelihood(model, tok, c, o)[0] for c, o in pairs]
        correct += int(np.argmax(lls) == ex.answer)
    assert got["acc"] == pytest.approx(correct / 3)
