"""Write metalora multiple-choice examples as a local lm-evaluation-harness task (JSONL + task YAML).

The task scores exactly what ``metalora eval`` scores (``metalora.eval.tasks``), so both tools give the
same log-likelihoods and accuracies on the same items:

- context: the example's ``prompt`` as is (``doc_to_text: query``; no template, no stripping), preceded
  by ``description`` and, for k-shot, the first k ``fewshot`` examples, each rendered as
  ``prompt + " " + "B. <option>" + "\\n\\n"`` (lm-eval's ``first_n`` sampler = metalora's default);
- continuations: ``" " + "A. <option>"`` for every option (``mc_view``'s rendering, target delimiter
  ``" "``), so ``acc_norm`` divides by the character length of ``"A. <option>"`` in both tools;
- tokenisation: lm-eval's ``hf`` model and ``metalora.eval.multiple_choice`` share ``_encode_pair``; pass
  ``add_bos_token=False`` in ``--model_args`` for a tokenizer that would add a BOS token by default
  (metalora encodes without special tokens; SmolLM2's tokenizer adds none either way).

The YAML names the JSONL by absolute path (lm-eval resolves ``data_files`` against the working
directory, not the YAML), so the folder is not relocatable: write it again after moving it.

    yaml_path = write_lm_eval_task(task.test, "lm_eval_tasks/", "metalora_arc_easy")
    # lm_eval --model hf --model_args pretrained=BASE,peft=PEFT_DIR \\
    #     --include_path lm_eval_tasks/ --tasks metalora_arc_easy
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from metalora.data import Example
from metalora.eval.tasks import mc_view

__all__ = ["write_lm_eval_task"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _rows(examples: Sequence[Example], what: str, description: str = "") -> list[dict]:
    rows = []
    for i, ex in enumerate(examples):
        if not ex.options:
            raise ValueError(
                f"{what}[{i}] (id {ex.id!r}, task {ex.task!r}) has no options: not multiple choice"
            )
        if ex.answer is None or not 0 <= ex.answer < len(ex.options):
            raise ValueError(
                f"{what}[{i}] (id {ex.id!r}) needs an answer index in [0, {len(ex.options)}), got {ex.answer!r}"
            )
        view = mc_view(ex)
        row = {"id": ex.id, "task": ex.task, "query": view.prompt, "choices": view.options, "gold": ex.answer}
        if description:
            row["description"] = description  # read as a field, so no Jinja rendering of its text
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_lm_eval_task(
    examples: Sequence[Example],
    out_dir: str | Path,
    task_name: str,
    *,
    fewshot: Sequence[Example] | None = None,
    num_fewshot: int = 0,
    description: str = "",
) -> Path:
    """Write ``{task_name}.jsonl`` (and ``{task_name}_fewshot.jsonl``) and ``{task_name}.yaml`` into
    ``out_dir``; return the YAML's path. Pass ``out_dir`` to lm-eval as ``--include_path``.

    ``examples``: multiple-choice ``Example``s (options and an answer each), scored in this order.
    ``fewshot``/``num_fewshot``: the first ``num_fewshot`` of ``fewshot`` precede every prompt, as
    ``metalora.eval.tasks`` does with ``shots=num_fewshot`` and the task's dev split as pool (the pool must
    not contain the scored items). ``description`` heads every context (e.g. MMLU's header line).
    """
    if not _NAME.match(task_name):
        raise ValueError(f"task_name {task_name!r}: use letters, digits, '_', '.', '-' (lm-eval task names)")
    if not examples:
        raise ValueError("no examples to write")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot > 0 and (fewshot is None or len(fewshot) < num_fewshot):
        have = 0 if fewshot is None else len(fewshot)
        raise ValueError(f"num_fewshot={num_fewshot} needs that many fewshot examples, got {have}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task_name}.jsonl"
    _write_jsonl(data, _rows(examples, "examples", description))
    data_files = {"test": str(data)}
    config: dict = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",  # a field name: the raw string, no Jinja rendering
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "num_fewshot": num_fewshot,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": "metalora.eval.lm_eval_task"},
    }
    if description:
        config["description"] = "description"  # the field name (see _rows)
    if num_fewshot > 0:
        shots = out / f"{task_name}_fewshot.jsonl"
        _write_jsonl(shots, _rows(list(fewshot or [])[:num_fewshot], "fewshot"))
        data_files["fewshot"] = str(shots)
        config["fewshot_split"] = "fewshot"
        config["fewshot_config"] = {"sampler": "first_n"}
    path = out / f"{task_name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
