"""Tasks from files: sources, field mapping, templates, seeded splits, and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metalora.data import (
    Example,
    MetaloraDataError,
    Task,
    TaskSpec,
    load_task,
    load_tasks,
    read_records,
    split_examples,
    split_sizes,
    task_id_map,
)

FIX = Path(__file__).parent / "fixtures" / "data"


def qa_spec(**kw) -> dict:
    return {
        "name": "qa",
        "path": str(FIX / "qa.jsonl"),
        "prompt_template": "Q: {question}\nA:",
        "response_template": " {answer}",
        "id_field": "id",
        **kw,
    }


# ---------------------------------------------------------------------------------------------- sources


def test_jsonl_columns_with_templates():
    task = load_task(qa_spec(), seed=0)
    assert task.sizes() == {"train": 10, "dev": 1, "test": 1}  # 12 * 0.1 = 1.2 -> 1
    ex = next(e for e in task.train + task.dev + task.test if e.id == "qa/all/q3")
    assert ex.prompt == "Q: What is 3 plus 3?\nA:"
    assert ex.response == " 6"
    assert ex.task == "qa" and ex.options is None and ex.answer is None
    assert task.meta["seed"] == 0 and task.meta["kind"] == "gen"
    assert str(FIX / "qa.jsonl") in task.meta["source"]


def test_csv_multiple_choice_columns_and_letter_answers():
    spec = {
        "name": "mc",
        "path": str(FIX / "mc.csv"),
        "prompt_field": "question",
        "options_field": ["opt_a", "opt_b", "opt_c"],
        "answer_field": "label",
        "split": (1.0, 0.0, 0.0),
    }
    task = load_task(spec, seed=3)
    assert task.sizes() == {"train": 4, "dev": 0, "test": 0}
    by_id = {e.id: e for e in task.train}
    ex = by_id["mc/all/1"]
    assert ex.options == ["dog", "red", "table"] and ex.answer == 1
    assert ex.prompt == "Which is a colour?\nA. dog\nB. red\nC. table\nAnswer:"
    assert ex.response == " B. red"
    assert task.meta["kind"] == "mc"
    assert load_task({**spec, "mc_response": "letter"}).train[0].response in {" A", " B", " C"}
    text = {e.id: e.response for e in load_task({**spec, "mc_response": "text"}).train}
    assert text["mc/all/3"] == " dog"


def test_parquet_and_hf_disk_sources_match_jsonl(tmp_path):
    import datasets

    rows = read_records(FIX / "qa.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "qa_hf"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:5]), "test": datasets.Dataset.from_list(rows[5:])}
    ).save_to_disk(str(tmp_path / "qa_dd"))
    assert read_records(tmp_path / "qa.parquet") == rows
    assert read_records(tmp_path / "qa_hf") == rows
    assert read_records(tmp_path / "qa_dd", hf_split="test") == rows[5:]
    with pytest.raises(MetaloraDataError, match=r"has splits \['train', 'test'\]; set hf_split"):
        read_records(tmp_path / "qa_dd")
    a = load_task(qa_spec(), seed=1)
    b = load_task(qa_spec(path=str(tmp_path / "qa.parquet")), seed=1)
    c = load_task(qa_spec(path=str(tmp_path / "qa_hf")), seed=1)
    assert [e.id for e in a.train] == [e.id for e in b.train] == [e.id for e in c.train]


def test_hf_load_dataset_on_local_json_files(tmp_path):
    (tmp_path / "d").mkdir()
    rows = read_records(FIX / "qa.jsonl")
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_records(tmp_path / "d", file_format="hf", hf_split="train") == rows


def test_alpaca_schema():
    task = load_task(
        {"name": "alp", "path": str(FIX / "alpaca.jsonl"), "schema": "alpaca", "split": (1, 0, 0)}
    )
    by_id = {e.id: e for e in task.train}
    with_input, no_input = by_id["alp/all/0"], by_id["alp/all/1"]
    assert with_input.prompt.endswith(
        "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n"
    )
    assert with_input.response == "chat"
    assert "### Input" not in no_input.prompt and no_input.prompt.endswith("Say hello.\n\n### Response:\n")


def test_messages_schema_keeps_context_for_chat_template():
    task = load_task(
        {"name": "chat", "path": str(FIX / "chat.jsonl"), "schema": "messages", "split": (1, 0, 0)}
    )
    ex = {e.id: e for e in task.train}["chat/all/0"]
    assert ex.prompt == "System: Be brief.\nUser: Capital of France?\nAssistant:"
    assert ex.response == " Paris."
    assert ex.meta["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]


def test_pre_split_paths_keep_their_splits():
    spec = qa_spec(path={"train": str(FIX / "qa.jsonl"), "test": str(FIX / "mc.csv")})
    spec.update(prompt_template=None, response_template=None, id_field=None)
    with pytest.raises(MetaloraDataError, match="missing field 'prompt'"):
        load_task(spec)
    spec = {"name": "pre", "path": {"train": str(FIX / "qa.jsonl"), "dev": str(FIX / "qa.jsonl")},
            "prompt_field": "question", "response_field": "answer"}  # fmt: skip
    task = load_task(spec)
    assert task.sizes() == {"train": 12, "dev": 12, "test": 0}
    assert task.train[0].id == "pre/train/0" and task.dev[0].id == "pre/dev/0"


# ------------------------------------------------------------------------------------------------ splits


def test_split_sizes_round_half_up():
    assert split_sizes(570, (0.8, 0.1, 0.1)) == (456, 57, 57)
    assert split_sizes(3270, (0.8, 0.1, 0.1)) == (2616, 327, 327)
    assert split_sizes(15, (0.8, 0.1, 0.1)) == (11, 2, 2)  # 1.5 -> 2
    assert split_sizes(10, (0.5, 0.5, 0.0)) == (5, 5, 0)


def test_split_is_deterministic_partition_and_seed_dependent():
    exs = [Example(f"p{i}", f"r{i}", "t", f"t/{i}") for i in range(100)]
    a = split_examples(exs, seed=7, task="t")
    b = split_examples(exs, seed=7, task="t")
    c = split_examples(exs, seed=8, task="t")

    def ids(split):
        return [[e.id for e in part] for part in split]

    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert [len(p) for p in a] == [80, 10, 10]
    assert sorted(i for part in ids(a) for i in part) == sorted(e.id for e in exs)  # partition: nothing lost


# ---------------------------------------------------------------------------------------------- bad input


def test_malformed_jsonl_line_gives_file_and_line():
    with pytest.raises(MetaloraDataError, match=r"bad_line\.jsonl:3: malformed JSON line"):
        load_task({"name": "bad", "path": str(FIX / "bad_line.jsonl")})


def test_missing_field_names_field_and_lists_available():
    with pytest.raises(MetaloraDataError) as e:
        load_task({"name": "mf", "path": str(FIX / "missing_field.jsonl")})
    msg = str(e.value)
    assert "missing field 'response'" in msg and "['prompt', 'reply']" in msg and "record 2" in msg


def test_template_with_missing_field():
    with pytest.raises(
        MetaloraDataError, match=r"missing field 'questoin'; available fields: \['answer', 'id', 'question'\]"
    ):
        load_task(qa_spec(prompt_template="Q: {questoin}"))


def test_empty_task():
    with pytest.raises(MetaloraDataError, match=r"task 'e': .*empty\.jsonl holds no records \(empty task\)"):
        load_task({"name": "e", "path": str(FIX / "empty.jsonl")})
    with pytest.raises(MetaloraDataError, match="task 'x' is empty"):
        Task("x", [], [], [], {})


def test_duplicate_task_names():
    with pytest.raises(MetaloraDataError, match=r"duplicate task names \['arc_easy'\]"):
        load_tasks(["arc_easy", {"name": "arc_easy", "builtin": "arc_challenge"}])
    with pytest.raises(MetaloraDataError, match="duplicate"):
        task_id_map(["a", "b", "a"])
    assert task_id_map(["a", "b"]) == {"a": 0, "b": 1}


def test_unknown_builtin_lists_available():
    with pytest.raises(MetaloraDataError) as e:
        load_task("arc_medium")
    msg = str(e.value)
    assert "unknown built-in task 'arc_medium'" in msg
    for name in ("arc_easy", "boolq", "gsm8k", "mmlu", "mmlu:anatomy", "bbh:<task>"):
        assert repr(name) in msg


def test_not_utf8_names_file_and_line():
    # line 1 is 37 bytes; the bad byte 0xE9 follows the 15 bytes '{"prompt": "caf' of line 2: offset 52
    with pytest.raises(MetaloraDataError, match=r"not_utf8\.jsonl:2: not valid UTF-8 \(byte offset 52"):
        load_task({"name": "u", "path": str(FIX / "not_utf8.jsonl")})


def test_csv_row_with_extra_cells():
    with pytest.raises(MetaloraDataError, match=r"bad_cells\.csv:3: row has more cells"):
        read_records(FIX / "bad_cells.csv")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(MetaloraDataError, match="data file not found"):
        load_task({"name": "m", "path": str(tmp_path / "nope.jsonl")})
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MetaloraDataError, match="cannot tell the format"):
        read_records(tmp_path / "x.txt")


def test_taskspec_validation():
    with pytest.raises(MetaloraDataError, match=r"unknown task config keys \['promt_field'\]"):
        TaskSpec.from_dict({"name": "a", "path": "x.jsonl", "promt_field": "q"})
    with pytest.raises(MetaloraDataError, match="summing to 1"):
        TaskSpec(name="a", path="x.jsonl", split=(0.5, 0.1, 0.1))
    with pytest.raises(MetaloraDataError, match="either builtin or path"):
        TaskSpec(name="a", path="x.jsonl", builtin="boolq")
    with pytest.raises(MetaloraDataError, match="unknown schema"):
        TaskSpec(name="a", path="x.jsonl", schema="sharegpt")
    with pytest.raises(MetaloraDataError, match="unknown mc_response"):
        TaskSpec(name="a", mc_response="number")
    with pytest.raises(MetaloraDataError, match="options_field and answer_field together"):
        TaskSpec(name="a", path="x.jsonl", options_field="choices")
    assert TaskSpec(name="boolq").builtin == "boolq"


def test_bad_mc_answer():
    with pytest.raises(MetaloraDataError, match="answer 'Z' is out of range for 3 options"):
        from metalora.data.templates import parse_answer

        parse_answer("Z", ["a", "b", "c"], "here")
    with pytest.raises(MetaloraDataError, match="out of range"):
        Example("p", "r", "t", "t/0", options=["a"], answer=1)


def test_train_from_test_moves_the_same_items_whatever_the_seed(tmp_path):
    """``train_from_test``: k test items move to train, chosen by the task name alone (every run scores the
    same rest), disjoint from the scored items, and together with them exactly the original test split."""
    import json as _json

    from metalora.data import load_task
    from metalora.data.errors import MetaloraDataError

    rows = [{"id": str(i), "prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    file = tmp_path / "t.jsonl"
    file.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    spec = {"name": "t", "path": {"test": str(file)}, "id_field": "id"}
    plain = load_task(spec, seed=0)
    assert (len(plain.train), len(plain.test)) == (0, 40)
    moved = [load_task({**spec, "train_from_test": 5}, seed=s) for s in (0, 7)]
    assert [e.id for e in moved[0].train] == [e.id for e in moved[1].train] and len(moved[0].train) == 5
    kept = [e.id for e in moved[0].test]
    assert not set(kept) & {e.id for e in moved[0].train}
    assert sorted(kept + [e.id for e in moved[0].train]) == sorted(e.id for e in plain.test)
    assert kept == [e.id for e in plain.test if e.id in set(kept)]  # the rest keeps its order
    assert "5 test items moved to train" in moved[0].meta["split_rule"]
    with pytest.raises(MetaloraDataError, match="would leave no test item"):
        load_task({**spec, "train_from_test": 40})
    with pytest.raises(MetaloraDataError, match="non-negative integer"):
        load_task({**spec, "train_from_test": -1})
