"""Bad input a new user would give ``metalora train``: each ends in exit status 2 and one line on stderr
that names the file, line, field or key and what was expected (never a traceback, never a write outside
the run directory).

Oracle: the exit status, the single stderr line and the words it must contain. Each case was seen to
fail before its fix (a 29- to 87-line traceback, or exit 0 with the bad value used).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_run import _tiny_base

from metalora.cli import main


def _recipe(tmp_path: Path, **changes) -> Path:
    _tiny_base(tmp_path / "base")
    rows = [{"q": f"w{i} w{i + 1}", "a": f"w{i + 2}"} for i in range(20)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "t", "path": str(tmp_path / "t.jsonl"), "prompt_field": "q", "response_field": "a"}
    recipe = {
        "name": "r",
        "output_dir": str(tmp_path / "runs"),
        "algorithm": "lora_mt",
        "model": str(tmp_path / "base"),
        "adapter": {"r": 2},
        "data": {"tasks": [task], "examples_per_task": 8, "max_length": 16},
        "multitask": {"batch_size": 4},
        "train": {"max_steps": 1, "progress": False},
    }
    for key, value in changes.items():
        recipe[key] = value
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def _one_line_error(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  lr: [1e-4\n  max_steps: 3\n")
    _one_line_error(capsys, ["train", str(path)], str(path), "line 4", "YAML")


def test_a_binary_config_is_named(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    _one_line_error(capsys, ["train", str(path)], str(path), "UTF-8")


def test_a_model_path_that_does_not_exist(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    missing = tmp_path / "no" / "such" / "model"
    _one_line_error(
        capsys, ["train", str(recipe), f"model={missing}"], str(missing), "no such model directory"
    )


@pytest.mark.parametrize("value", [["w1", "w2"], {"nested": "w1"}])
def test_task_fields_holding_lists_or_dicts_are_refused(tmp_path, capsys, value):
    recipe = _recipe(tmp_path)
    rows = [{"q": "w1 w2", "a": "w3"}] * 5 + [{"q": value, "a": "w3"}] + [{"q": "w1", "a": "w2"}] * 14
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _one_line_error(capsys, ["train", str(recipe)], "t.jsonl", "record 6", "'q'", "text")
    assert not (tmp_path / "runs" / "r" / "adapter").exists()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".hidden", "a\\b", ""])
def test_task_names_that_are_not_plain_names_are_refused(tmp_path, capsys, name):
    recipe = json.loads(_recipe(tmp_path).read_text())
    recipe["data"]["tasks"][0]["name"] = name
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    _one_line_error(capsys, ["train", str(tmp_path / "recipe.json")], "task name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "recipe.json", "t.jsonl"]
