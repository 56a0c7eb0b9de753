"""BIG-Bench Hard (``bbh:<task>``): test items from BIG-bench's task files, 3-shot exemplars from lm-eval.

BBH (Suzgun et al., 2022) is 27 tasks of BIG-bench, asked as ``"Q: {input}\\nA:"`` with the 3-shot
chain-free exemplars that lm-evaluation-harness ships (``lm_eval/tasks/bbh/fewshot/<task>.yaml``, sampler
``first_n``, each task's one-line description in front). There is no hub here, so the test items come
from the ``bigbench==1.0.0`` sdist's ``benchmark_tasks/**/task.json`` (``python -m metalora.data.fetch_bbh``
fetches and unpacks just those files into metalora's cache) and are rendered the way BBH renders them:

* letter tasks (BBH answers ``(A)``, ``(B)``…): ``"Q: {prefix}{input}\\nOptions:\\n(A) …\\nA:"``, scored over
  the options ``"(A)"``, ``"(B)"``… by log-likelihood (``acc`` is the exact-match accuracy of BBH); items
  with more than 26 choices (some of ``reasoning_about_colored_objects``) are dropped and counted in the
  task's ``meta["eval"]["dropped_items"]``;
* word tasks (``Yes``/``No``, ``valid``/``invalid``, ``yes``/``no``): the BIG-bench choices mapped to BBH's
  answer words (``navigate``: True→Yes, ``sports_understanding``: plausible→yes), scored the same way;
* free-form tasks (``object_counting``, ``word_sorting``): greedy generation until a blank line or the
  next ``Q:``, exact match on the first line.

BBH re-worded some BIG-bench inputs, so numbers are comparable to lm-eval's ``bbh_fewshot`` but not equal.
Four BBH tasks cannot be built from the sdist and raise a clear error: ``boolean_expressions``,
``multistep_arithmetic_two`` and ``web_of_lies`` (absent) and ``dyck_languages`` (BIG-bench's is a
next-symbol choice, BBH's a free-form completion). Written by hand: no library renders BIG-bench as BBH.
"""

from __future__ import annotations

import importlib.util
import json
import re
import site
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metalora.data.errors import MetaloraDataError
from metalora.data.example import Example
from metalora.models import cache_dir

BIGBENCH_SDIST = "bigbench==1.0.0"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# BBH name -> BIG-bench directory, where they differ (subtasks: logical_deduction/three_objects etc.)
ALIASES = {"causal_judgement": "causal_judgment", "formal_fallacies": "formal_fallacies_syllogisms_negation"}
# BIG-bench choice -> BBH answer word
WORD_ANSWERS = {
    "navigate": {"True": "Yes", "False": "No"},
    "sports_understanding": {"plausible": "yes", "implausible": "no"},
}
UNBUILDABLE = {
    "boolean_expressions": "it is not in the bigbench 1.0.0 sdist",
    "multistep_arithmetic_two": "it is not in the bigbench 1.0.0 sdist",
    "web_of_lies": "it is not in the bigbench 1.0.0 sdist",
    "dyck_languages": "BIG-bench's version is a next-symbol choice while BBH's is a free-form completion",
}
STOP = ("\n\n", "Q:")


def cache_root() -> Path:
    return cache_dir() / "bigbench" / "benchmark_tasks"


def bigbench_roots() -> list[Path]:
    """Every ``bigbench/benchmark_tasks`` directory on ``sys.path``, in site-packages, or in metalora's cache."""
    entries = list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]
    candidates = [Path(entry or ".") / "bigbench" / "benchmark_tasks" for entry in entries] + [cache_root()]
    roots, seen = [], set()
    for root in candidates:
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            roots.append(root)
    return roots


def task_file(task: str) -> Path:
    """The ``task.json`` of BBH task ``task`` (``logical_deduction_three_objects`` → ``logical_deduction/three_objects``)."""
    if task in UNBUILDABLE:
        raise MetaloraDataError(
            f"bbh:{task} cannot be built from BIG-bench's task files: {UNBUILDABLE[task]}"
        )
    roots = bigbench_roots()
    if not roots:
        raise MetaloraDataError(
            f"bbh:{task} needs the BIG-bench task files (bigbench/benchmark_tasks/**/task.json), found nowhere on "
            f"sys.path, site-packages or {cache_root()}. Do not pip install bigbench (it pulls tensorflow): run "
            "`python -m metalora.data.fetch_bbh` to fetch the sdist and unpack the BBH task files into the cache."
        )
    name = ALIASES.get(task, task)
    parts = name.split("_")
    for root in roots:
        candidates = [root / name / "task.json"]
        candidates += [
            root / "_".join(parts[:k]) / "_".join(parts[k:]) / "task.json" for k in range(1, len(parts))
        ]
        for c in candidates:
            if c.is_file():
                return c
    available = sorted(
        {p.parent.relative_to(r).as_posix().replace("/", "_") for r in roots for p in r.glob("**/task.json")}
    )
    raise MetaloraDataError(
        f"no BIG-bench task {task!r} in {[str(r) for r in roots]}; available: {available}"
    )


@cache
def lm_eval_fewshot(task: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(description, ((input, target), …)) of lm-eval's BBH 3-shot config for ``task``, or None if lm-eval
    or the task's file is not installed. Read as YAML text: lm-eval is not imported."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "bbh" / "fewshot" / f"{task}.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        samples = config["fewshot_config"]["samples"]
        shots = tuple((str(s["input"]), str(s["target"])) for s in samples)
    except (KeyError, TypeError) as e:
        raise MetaloraDataError(f"{path}: expected fewshot_config.samples with input/target ({e})") from None
    return str(config.get("description", "")), shots


def _letter_task(shots: tuple[tuple[str, str], ...] | None) -> bool:
    return shots is None or all(re.fullmatch(r"\([A-Z]\)", t) for _, t in shots)


def _words(shots: tuple[tuple[str, str], ...]) -> set[str]:
    return {t for _, t in shots}


def _free_target(target: Any, shots: tuple[tuple[str, str], ...] | None) -> str:
    """One gold string; of a list of accepted targets, the digits one when BBH's exemplars are numbers."""
    if not isinstance(target, list):
        return str(target)
    numeric = shots is not None and all(t.lstrip("-").isdigit() for _, t in shots)
    for t in target:
        if not numeric or str(t).lstrip("-").isdigit():
            return str(t)
    return str(target[0])


def _mc_item(
    ex: dict[str, Any], question: str, shots: Any, words: dict[str, str] | None, path: Path, task: str
) -> tuple[str, list[str], int] | None:
    """(prompt, options, answer) of a multiple-choice BIG-bench example in BBH's format; None where it has
    more choices than letters."""
    choices = list(ex["target_scores"])
    answer = int(np.argmax([ex["target_scores"][c] for c in choices]))
    if _letter_task(shots):
        if len(choices) > len(LETTERS):
            return None
        listing = "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices))
        options = [f"({LETTERS[j]})" for j in range(len(choices))]
    else:
        options = [(words or {}).get(c, c) for c in choices]
        if shots is not None and not set(options) <= _words(shots):
            raise MetaloraDataError(
                f"{path}: bbh:{task} choices {choices} do not map onto BBH's answers {sorted(_words(shots))}"
            )
        listing = "\n".join(f"- {o}" for o in options)
    return f"Q: {question}\nOptions:\n{listing}\nA:", options, answer


def _demos(name: str, shots: Any, test_options: list[str] | None) -> list[Example]:
    """lm-eval's exemplars as examples; for MC tasks the exemplar's answer is one of the scored options, so
    it renders as "A: (D)"."""
    demos = []
    for j, (inp, target) in enumerate(shots or ()):
        demo_id = f"{name}/fewshot/{j}"
        if test_options is None:
            demos.append(Example(f"Q: {inp}\nA:", " " + target, name, demo_id, meta={"target": target}))
            continue
        options = list(test_options) if target in test_options else [target]
        demos.append(
            Example(
                f"Q: {inp}\nA:", " " + target, name, demo_id, options=options, answer=options.index(target)
            )
        )
    return demos


def load_bbh(task: str, name: str) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """({"test": items, "fewshot": lm-eval's exemplars}, eval settings) for BBH task ``task``."""
    path = task_file(task)
    data = json.loads(path.read_text(encoding="utf-8"))
    prefix = data.get("task_prefix", "")
    fewshot = lm_eval_fewshot(task)
    description, shots = fewshot if fewshot is not None else ("", None)
    test: list[Example] = []
    dropped = 0
    for i, ex in enumerate(data.get("examples", [])):
        ex_id = f"{name}/test/{i}"
        question = (prefix + ex["input"]).strip()
        if "target_scores" not in ex:
            target = _free_target(ex["target"], shots)
            test.append(Example(f"Q: {question}\nA:", " " + target, name, ex_id, meta={"target": target}))
            continue
        item = _mc_item(ex, question, shots, WORD_ANSWERS.get(task), path, task)
        if item is None:  # more choices than letters: BBH drops such items too
            dropped += 1
            continue
        prompt, options, answer = item
        test.append(Example(prompt, " " + options[answer], name, ex_id, options=options, answer=answer))
    if not test:
        raise MetaloraDataError(f"{path}: no examples")
    demos = _demos(name, shots, test[0].options)
    settings = {
        "shots": len(demos),
        "fewshot_sampler": "first_n",
        "description": description,
        "mc_response": "text",  # the options are the answers themselves: "(A)", "Yes"…
        "primary": "acc",
        "extractor": "first_line",
        "stop": list(STOP),
        "max_new_tokens": 64,
        "dropped_items": dropped,
    }
    return {"test": test, "fewshot": demos}, settings


BBH_TASKS = [
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
]  # fmt: skip
