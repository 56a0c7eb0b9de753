"""Fuzzed inputs (issue 14 item 5): config files, overrides and task files (JSONL, CSV, Parquet).

Every input must end in correct behaviour or in a one-line error that names the file, line, field or key:
a ``ValueError`` (``RunConfigError``, ``MetaloraDataError``...), which ``metalora train`` prints as one line
and exits 2 on. Any other exception would be a traceback. The properties stop before a model is loaded
(``RunConfig.from_yaml``, ``load_task``); ``test_cli_*`` run ``metalora train`` end to end on a handful of
cases with a tiny local model and check that nothing is written outside the run directory.

Deterministic (``derandomize=True``). ``METALORA_FUZZ_EXAMPLES=N`` raises the examples per property (default
150, about 10 s in all) for a longer local run; ``--hypothesis-show-statistics`` counts the cases tried.
A run of 1,000 per property (8,000 cases, ~40 s) passes; against the code before issue 14 it found the bugs
listed in the commit that added this file.

Oracles: for a refused input, the words the message must contain (computed from the input, e.g. the first
bad line of a JSONL file); for an accepted one, the examples equal the records' text, and a resolved config
holds only finite numbers and a plain run name. The bugs it found in the run config (pinned as strict
xfails until fixed) are fixed; their cases stay as plain tests at the end.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import _recipe

from metalora.adapters.api import ADAPTER_TYPES
from metalora.cli import main
from metalora.data import load_task
from metalora.train.config import SECTIONS, RunConfig

FUZZ = settings(
    max_examples=int(os.environ.get("METALORA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """A fresh file path per call, in one module-wide directory (hypothesis runs many examples per test)."""
    root = tmp_path_factory.mktemp("fuzz")
    counter = iter(range(10**9))
    yield lambda suffix: root / f"case{next(counter)}{suffix}"


def refused(exc: BaseException | None, *names: str) -> str:
    """The oracle for a refused input: a ValueError whose message is one line naming one of ``names``."""
    assert exc is not None, "accepted, expected an error"
    assert isinstance(exc, ValueError), f"{type(exc).__name__} would print a traceback: {exc}"
    message = str(exc)
    assert message.strip() and "\n" not in message, message
    assert any(n in message or repr(n) in message for n in names), (names, message)
    return message


def attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args), None
    except Exception as exc:  # the property decides what an exception means
        return None, exc


# ------------------------------------------------------------------------------------------- configs

BASE: dict[str, Any] = {
    "name": "r",
    "algorithm": "lora_mt",
    "model": "tiny",
    "data": {"tasks": ["arc_easy"]},
    "train": {"max_steps": 1},
}
TOP_KEYS = [f.name for f in fields(RunConfig) if f.name not in (*SECTIONS, "adapter", "data")]
KEYS = (
    [(k,) for k in TOP_KEYS]
    + [(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls)]
    + [("adapter", f.name) for f in fields(ADAPTER_TYPES["lora"][0])]
    + [("adapter", "type")]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["../x", "a/b", "..", "", "1e-4", "nan", "-1", math.inf, -math.inf, math.nan, 0, -1]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _plain_name(name: str | None) -> bool:
    return bool(name) and Path(str(name)).name == name and name not in (".", "..")


def _write_config(path: Path, recipe: Any) -> Path:
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def check_config(path: Path, overrides: list[str], *names: str) -> None:
    """``from_yaml`` gives a config holding finite numbers and a plain run name, or a refusal naming one
    of ``names`` (or the file)."""
    config, exc = attempt(RunConfig.from_yaml, path, overrides)
    if exc is not None:
        refused(exc, str(path), *names)
    else:
        assert _finite(config.to_dict()), config.to_dict()
        assert _plain_name(config.name), config.name


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_config_text_parses_or_names_the_file(workdir, text):
    """Arbitrary text (and latin-1 bytes) as a config: refused naming the file, a key of what it parsed to,
    or ``data.tasks``."""
    path = workdir(".yaml")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    keys = [str(k) for k in parsed] if isinstance(parsed, dict) else []
    check_config(path, [], "data.tasks", *keys)


def _set(recipe: dict[str, Any], key: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(recipe))
    node = out
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    return out


@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_a_known_key_with_any_value_is_used_or_named(workdir, key, value):
    """Any value (wrong types, NaN, huge numbers, nesting) in any known key: accepted or refused naming the
    key. Oracle for acceptance: the resolved config holds only finite numbers and a plain run name."""
    path = _write_config(workdir(".yaml"), _set(BASE, key, value))
    check_config(path, [], key[-1], ".".join(key))


@FUZZ
@given(
    section=st.sampled_from([(), *[(s,) for s in SECTIONS if s != "data"], ("adapter",), ("data",)]),
    key=st.text(min_size=1, max_size=30),
)
def test_an_unknown_key_is_named(workdir, section, key):
    """A key no section has, at the top level or inside a section: refused naming it."""
    known = {k[-1] for k in KEYS if k[:-1] == section} | (
        {"data", "adapter", *SECTIONS} if not section else set()
    )
    if key in known:
        return
    path = _write_config(workdir(".yaml"), _set(BASE, (*section, key), 1))
    parsed = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML may fold a key ("\x85" reads as " ")
    for part in section:
        parsed = parsed[part]
    before = BASE
    for part in section:
        before = before.get(part, {})
    _, exc = attempt(RunConfig.from_yaml, path, [])
    refused(exc, *[str(k) for k in parsed if k not in before])


OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{'.'.join(k)}={v}", st.sampled_from(KEYS), st.text(max_size=30)),
    st.builds(lambda k, v: f"{'.'.join(k)}={json.dumps(v)}", st.sampled_from(KEYS), VALUES),
    st.text(max_size=40),
)


@FUZZ
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
def test_overrides_are_applied_or_named(workdir, overrides):
    """``key=value`` overrides with any text: applied, or refused naming the override or its key."""
    path = _write_config(workdir(".yaml"), BASE)
    names = [o for o in overrides] + [o.partition("=")[0].split(".")[-1] for o in overrides]
    check_config(path, overrides, *names)


# ---------------------------------------------------------------------------------------- task files

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\u2028", "a\u2029b", "\x00", "\ufeffx", "é" * 3, "𝔘𝔫𝔦", "\r\n", '"', "\\"]),
    st.integers(0, 9).map(lambda n: "w" * (5000 * n)),  # very long lines
)
FIELD = st.one_of(
    TEXT, st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(TEXT, max_size=2)
)


def _spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "t", "path": str(path), "prompt_field": "q", "response_field": "a", **extra}


def _text_of(value: Any) -> str | None:
    """What a field holding ``value`` must become, or None where it must be refused."""
    if value is None or isinstance(value, (list, dict)):
        return None
    return str(value)


def check_records(path: Path, records: list[dict[str, Any]], spec: dict[str, Any], where: Callable) -> None:
    """``load_task`` on a file holding ``records``: refused at the first bad record (``where(i)`` and the
    field named), or at a repeated id; accepted with every record's text, in some split."""
    task, exc = attempt(load_task, spec)
    expected = []
    for i, rec in enumerate(records, start=1):
        for field in ("q", "a"):
            if field not in rec or _text_of(rec[field]) is None:
                refused(exc, where(i))
                assert repr(field) in str(exc), str(exc)
                return
        expected.append((_text_of(rec["q"]), _text_of(rec["a"])))
    ids = [str(r["id"]) for r in records] if "id_field" in spec else []
    if len(set(ids)) != len(ids):
        refused(exc, "same id")
        return
    assert exc is None, f"refused a valid file: {exc!r}"
    got = [(e.prompt, e.response) for e in task.train + task.dev + task.test]
    assert sorted(got) == sorted(expected)


RECORD = st.fixed_dictionaries({"q": FIELD, "a": FIELD}, optional={"id": st.integers(0, 3)})
JSONL_LINE = st.one_of(
    RECORD.map(lambda r: json.dumps(r, ensure_ascii=False)),
    RECORD.map(json.dumps),
    st.text(max_size=30).filter(lambda s: "\n" not in s),
    st.sampled_from(["", "[1, 2]", "null", '"text"', "{", '{"q": "x", "a": }']),
)


@FUZZ
@given(lines=st.lists(JSONL_LINE, min_size=1, max_size=8), with_ids=st.booleans())
def test_jsonl_task_files(workdir, lines, with_ids):
    """Any mix of records (wrong types, unicode incl. U+2028, very long lines, empty fields), malformed
    lines and non-objects: the first bad line is named ``file:line``, a bad record ``record k`` and its field,
    a repeated id is refused; otherwise every record becomes an example with its text."""
    path = workdir(".jsonl")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            refused(attempt(load_task, _spec(path))[1], f"{path}:{lineno}")
            return
        records.append(obj)
    if not records:
        refused(attempt(load_task, _spec(path))[1], "no records")
        return
    if with_ids and any("id" not in r for r in records):
        with_ids = False
    spec = _spec(path, id_field="id") if with_ids else _spec(path)
    check_records(path, records, spec, lambda i: f"record {i})")


@FUZZ
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=6), extra=st.integers(0, 6))
def test_csv_task_files(workdir, rows, extra):
    """Quoted commas, newlines and unicode round-trip; a row with one extra cell is named ``file:line``."""
    path = workdir(".csv")
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["q", "a"])
    lines = [1]
    for j, (q, a) in enumerate(rows):
        writer.writerow([q, a, "x"] if j == extra else [q, a])
        lines.append(len(io.StringIO(out.getvalue(), newline="").readlines()))  # \r, \n, \r\n end a line
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass"))
    if extra < len(rows):
        refused(attempt(load_task, _spec(path))[1], f"{path}:{lines[extra + 1]}")
        return
    records = [{"q": q, "a": a} for q, a in rows]
    check_records(path, records, _spec(path), lambda i: f"record {i})")


PARQUET_COLUMN = st.one_of(
    st.lists(st.text(max_size=10), min_size=4, max_size=4).map(lambda v: (v, pa.string())),
    st.lists(st.integers(-5, 5), min_size=4, max_size=4).map(lambda v: (v, pa.int64())),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=4, max_size=4).map(
        lambda v: (v, pa.float64())
    ),
    st.lists(st.none() | st.text(max_size=3), min_size=4, max_size=4).map(lambda v: (v, pa.string())),
    st.lists(st.lists(st.text(max_size=3), max_size=2), min_size=4, max_size=4).map(
        lambda v: (v, pa.list_(pa.string()))
    ),
    st.lists(st.fixed_dictionaries({"x": st.text(max_size=3)}), min_size=4, max_size=4).map(
        lambda v: (v, pa.struct([("x", pa.string())]))
    ),
)


@FUZZ
@given(q=PARQUET_COLUMN, a=PARQUET_COLUMN, empty=st.booleans())
def test_parquet_task_files(workdir, q, a, empty):
    """Columns of strings, numbers, nulls, lists and structs: lists, structs and nulls are refused naming
    the record and field; an empty table is refused; the rest becomes examples with the values' text."""
    path = workdir(".parquet")
    n = 0 if empty else 4
    table = pa.table({"q": pa.array(q[0][:n], type=q[1]), "a": pa.array(a[0][:n], type=a[1])})
    pq.write_table(table, path)
    if empty:
        refused(attempt(load_task, _spec(path))[1], "no records")
        return
    check_records(path, table.to_pylist(), _spec(path), lambda i: f"record {i})")


@FUZZ
@given(name=st.one_of(st.text(max_size=60), st.sampled_from(["..", ".", "../x", "a/b", "a\\b", "x" * 300])))
def test_task_names(workdir, name):
    """A task name is a directory of a LoRA-ST run: accepted only as one plain path component (no
    separator, no leading dot, no control character, at most 200 bytes), refused naming ``task name``."""
    path = workdir(".jsonl")
    path.write_text('{"q": "w1", "a": "w2"}\n' * 5)
    task, exc = attempt(load_task, {**_spec(path), "name": name})
    plain = (
        _plain_name(name)
        and not name.startswith(".")
        and "\\" not in name
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
        and len(name.encode("utf-8", "surrogatepass")) <= 200
    )
    if plain:
        assert exc is None and task.name == name, exc
    else:
        refused(exc, "task name")


# ------------------------------------------------------------------------------ the command, end to end


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _setup(tmp_path: Path, monkeypatch, rows: list[dict[str, Any]], suffix: str = ".jsonl") -> Path:
    """``test_bad_inputs``' tiny model and recipe (2 steps), its task file replaced by ``rows`` (with an
    ``id`` column); the working directory an empty one."""
    recipe_path = _recipe(tmp_path, train={"max_steps": 2, "progress": False})
    data = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        out = io.StringIO(newline="")
        csv.writer(out).writerows([["id", "q", "a"], *[[r["id"], r["q"], r["a"]] for r in rows]])
        data.write_text(out.getvalue(), encoding="utf-8")
    else:
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = json.loads(recipe_path.read_text())
    recipe["data"]["tasks"][0].update(path=str(data), id_field="id")
    recipe_path.write_text(json.dumps(recipe))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return recipe_path


def _run(tmp_path: Path, capsys, *overrides: str) -> tuple[int, str, set[Path]]:
    """``metalora train`` on ``_setup``'s recipe: (exit status, stderr, files written outside the run
    directory, the working directory included)."""
    before = _files(tmp_path)
    capsys.readouterr()  # drop what building the fixtures printed
    status = main(["train", str(tmp_path / "recipe.json"), *overrides])
    written = {p for p in _files(tmp_path) - before if (tmp_path / "runs" / "r") not in p.parents}
    return status, capsys.readouterr().err.strip(), written


def _rows(n: int = 20, **change: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "q": f"w{i % 30} w{(i * 7) % 30}", "a": f"w{(i + 3) % 30}", **change}
        for i in range(n)
    ]


def test_cli_unicode_long_and_empty_fields_train(tmp_path, monkeypatch, capsys):
    """Oracle: exit 0, finite losses, nothing written outside the run directory, for a task file with
    U+2028 and other unicode, a 20,000-character prompt and empty responses (whose only label is EOS)."""
    rows = _rows()
    rows[0]["q"] = "w1\u2028w2 é 𝔘"
    rows[1]["q"] = "w3 " * 6666
    rows[2]["a"] = rows[3]["a"] = ""
    _setup(tmp_path, monkeypatch, rows)
    status, err, written = _run(tmp_path, capsys)
    assert status == 0 and not written, (err, written)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "runs/r/metrics.jsonl").read_text().splitlines()
    ]
    assert losses and all(math.isfinite(x) for x in losses)


def test_cli_some_samples_with_all_labels_masked_train(tmp_path, monkeypatch, capsys):
    """Oracle: with ``truncate=right`` the over-long samples keep no response token; they are counted in
    ``data.json`` and the run trains on the rest (exit 0, finite losses)."""
    rows = _rows()
    for r in rows[::2]:
        r["q"] = " ".join(f"w{j % 30}" for j in range(30))
    _setup(tmp_path, monkeypatch, rows)
    status, err, written = _run(tmp_path, capsys, "data.truncate=right")
    assert status == 0 and not written, (err, written)
    stats = json.loads((tmp_path / "runs/r/data.json").read_text())["tokenize"]["t"]
    assert 0 < stats["all_masked"] < stats["kept"]
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "runs/r/metrics.jsonl").read_text().splitlines()
    ]
    assert all(math.isfinite(x) for x in losses)


def _damage(tmp_path: Path, case: str) -> None:
    """Turn ``_setup``'s valid files into ``case``."""
    if case == "a csv row with an extra cell":
        data = tmp_path / "t.csv"
        lines = data.read_text(encoding="utf-8").splitlines()
        data.write_text("\n".join([*lines[:2], lines[2] + ",x", *lines[3:]]) + "\n", encoding="utf-8")
    elif case == "malformed yaml config":
        (tmp_path / "recipe.json").write_text("name: r\ntrain:\n  lr: [1e-4\n  max_steps: 3\n")


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("duplicate ids", ["t.jsonl", "records 1 and 2", "same id"]),
        ("a list in a field", ["t.jsonl", "record 5", "'q'", "list"]),
        ("a csv row with an extra cell", ["t.csv:3", "more cells"]),
        ("malformed yaml config", ["recipe.json", "line 4"]),
    ],
)
def test_cli_refuses_in_one_line(tmp_path, monkeypatch, capsys, case, words):
    """Oracle: exit 2, one stderr line holding ``words``, and no file written outside the run directory."""
    rows = _rows()
    if case == "duplicate ids":
        rows[1]["id"] = rows[0]["id"]
    elif case == "a list in a field":
        rows[4]["q"] = ["w1", "w2"]
    _setup(tmp_path, monkeypatch, rows, ".csv" if "csv" in case else ".jsonl")
    _damage(tmp_path, case)
    status, err, written = _run(tmp_path, capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), (words, err)
    assert not written, written


# ------------------------------------------------- the known bugs the fuzzing found, fixed since


def _was_a_bug(reason: str, *overrides: str, **changes: Any) -> Any:
    """A case that was a known bug (pinned as a strict xfail until its fix landed); now it must pass."""
    return pytest.param(overrides, changes, id=reason[:40])


@pytest.mark.parametrize(
    ("overrides", "changes"),
    [
        _was_a_bug("config.py apply_override: yaml.safe_load's error escapes (a traceback)", "train.lr=[1"),
        _was_a_bug("config.py _adapter_section merges a non-mapping before checking it", adapter=[1]),
        _was_a_bug(
            "reweight_config.py _coerce checks no types (TypeError later)",
            "reweight.val_batch_size=[]",
            algorithm="reweight",
            data={"tasks": ["arc_easy"], "val_task": "boolq"},
        ),
        _was_a_bug(
            "reweight_config.py prints an unknown key unquoted (a newline splits the message)",
            algorithm="reweight",
            data={"tasks": ["arc_easy"], "val_task": "boolq"},
            reweight={"a\nb": 1},
        ),
        _was_a_bug("config.py coerce accepts inf for float fields", "train.lr=.inf"),
        _was_a_bug("config.py: the run name is not checked (runs/../../x)", "name=../../escape"),
    ],
)
def test_config_refuses_what_were_known_bugs(overrides, changes):
    """Each must be refused with a one-line ValueError naming the key (``metalora train`` exits 2)."""
    _, exc = attempt(RunConfig.from_dict, {**BASE, **changes}, list(overrides))
    refused(exc, *[o.partition("=")[0].split(".")[-1] for o in overrides], *changes)


def test_a_task_whose_every_label_is_masked_is_refused(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch, [{**r, "q": " ".join(f"w{j % 30}" for j in range(30))} for r in _rows()])
    status, err, _ = _run(tmp_path, capsys, "data.truncate=right")
    assert status == 2 and "'t'" in err, err
