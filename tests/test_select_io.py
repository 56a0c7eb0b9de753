"""``select_jsonl`` end to end on temporary JSONL files, and its error messages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from metalora.select import select_jsonl
from metalora.select.bm25 import bm25_scores
from metalora.select.classifier import classifier_scores, pareto_keep
from metalora.select.dsir import dsir_log_importance, gumbel_top_k
from metalora.select.io import read_jsonl, read_texts, write_jsonl

CANDIDATES = [
    {"prompt": "What is the derivative of x squared?", "response": "2x", "id": "m1"},
    {"prompt": "How long should bread rise?", "response": "Overnight in the fridge.", "id": "c1"},
    {"prompt": "Integrate the polynomial x.", "response": "x squared over two", "id": "m2"},
    {"prompt": "How hot should the oven be for cake?", "response": "180 degrees", "id": "c2"},
    {"prompt": "Solve the equation 2x = 4.", "response": "x = 2", "id": "m3"},
    {"prompt": "What herbs go in tomato soup?", "response": "basil and oregano", "id": "c3"},
]
TARGET = [
    {"prompt": "Find the derivative of the polynomial x cubed.", "response": "3 x squared"},
    {"prompt": "Solve the equation x + 1 = 3 and integrate.", "response": "x = 2"},
]


def texts(rows: list[dict]) -> list[str]:
    return [r["prompt"] + "\n" + r["response"] for r in rows]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    cand, tgt = tmp_path / "cands.jsonl", tmp_path / "target.jsonl"
    write_jsonl(CANDIDATES, cand)
    write_jsonl(TARGET, tgt)
    return cand, tgt


def test_roundtrip_and_text_fields(files, tmp_path: Path) -> None:
    cand, _ = files
    assert read_jsonl(cand) == CANDIDATES
    rows, txt = read_texts(cand, ["prompt", "response"])
    assert rows == CANDIDATES and txt == texts(CANDIDATES)
    _, only_prompt = read_texts(cand, "prompt")
    assert only_prompt == [r["prompt"] for r in CANDIDATES]


def test_bm25_top_k_and_weights(files, tmp_path: Path) -> None:
    cand, tgt = files
    out = tmp_path / "out" / "bm25.jsonl"
    summary = select_jsonl("bm25", cand, tgt, out, k=3)
    expected = bm25_scores(texts(CANDIDATES), texts(TARGET))
    chosen = read_jsonl(out)
    assert summary["n_written"] == 3 and summary["n_candidates"] == 6 and summary["n_target"] == 2
    assert [r["id"] for r in chosen] == [
        CANDIDATES[i]["id"] for i in np.argsort(-expected, kind="stable")[:3]
    ]
    assert {r["id"] for r in chosen} == {"m1", "m2", "m3"}  # the math rows match the math targets
    np.testing.assert_allclose([r["selection_score"] for r in chosen], np.sort(expected)[::-1][:3], rtol=1e-6)
    assert {k: v for k, v in chosen[0].items() if k != "selection_score"} in CANDIDATES  # input fields kept

    select_jsonl("bm25", cand, tgt, out)  # no k: every row, weighted
    weighted = read_jsonl(out)
    assert [r["id"] for r in weighted] == [r["id"] for r in CANDIDATES]
    w = np.array([r["weight"] for r in weighted])
    np.testing.assert_allclose(w, expected / expected.mean(), rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)


def test_dsir_and_classifier(files, tmp_path: Path) -> None:
    cand, tgt = files
    out = tmp_path / "sel.jsonl"
    logw = dsir_log_importance(texts(CANDIDATES), texts(TARGET))
    select_jsonl("dsir", cand, tgt, out, k=2, seed=5)
    expected = gumbel_top_k(logw, 2, seed=5)
    assert [r["id"] for r in read_jsonl(out)] == [CANDIDATES[i]["id"] for i in expected]
    select_jsonl("dsir", cand, tgt, out, k=3, temperature=0.0)
    assert [r["id"] for r in read_jsonl(out)] == [CANDIDATES[i]["id"] for i in np.argsort(-logw)[:3]]
    select_jsonl("dsir", cand, tgt, out)
    w = np.array([r["weight"] for r in read_jsonl(out)])
    np.testing.assert_allclose(w, np.exp(logw) / np.exp(logw).mean(), rtol=1e-9)

    p = classifier_scores(texts(CANDIDATES), texts(TARGET), seed=0)
    select_jsonl("classifier", cand, tgt, out, sampling="pareto", alpha=1.0, seed=4)
    kept = [i for i in np.argsort(-p, kind="stable") if pareto_keep(p, 1.0, seed=4)[i]]
    assert [r["id"] for r in read_jsonl(out)] == [CANDIDATES[i]["id"] for i in kept]
    select_jsonl("classifier", cand, tgt, out, k=3)
    assert {r["id"] for r in read_jsonl(out)} == {"m1", "m2", "m3"}


def test_mix(files, tmp_path: Path) -> None:
    cand, tgt = files
    out = tmp_path / "mix.jsonl"
    summary = select_jsonl("mix", cand, tgt, out, ratio=2, seed=0)
    rows = read_jsonl(out)
    assert summary["n_from_candidates"] == 4 and summary["n_from_target"] == 2 and summary["n_written"] == 6
    assert Counter(r["selection_source"] for r in rows) == {"candidates": 4, "target": 2}


def test_errors_name_the_problem(files, tmp_path: Path) -> None:
    cand, tgt = files
    out = tmp_path / "o.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        select_jsonl("bm25", bad, tgt, out)
    bad.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(bad)
    bad.write_text('{"prompt": "a", "response": "b"}\n{"question": "c", "answer": "d"}\n')
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:2: no field 'prompt'.*available fields: \['answer', 'question'\]"
    ):
        select_jsonl("dsir", bad, tgt, out)
    bad.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        select_jsonl("bm25", tmp_path / "nope.jsonl", tgt, out)
    with pytest.raises(ValueError, match="unknown selection method 'bm52'"):
        select_jsonl("bm52", cand, tgt, out)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['alpha'\]"):
        select_jsonl("bm25", cand, tgt, out, alpha=2)
    with pytest.raises(ValueError, match="ratio applies to method 'mix' only"):
        select_jsonl("dsir", cand, tgt, out, ratio=5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        select_jsonl("bm25", cand, tgt, out, k=7)
    with pytest.raises(ValueError, match="do not pass k"):
        select_jsonl("classifier", cand, tgt, out, k=2, sampling="pareto")
    with pytest.raises(ValueError, match="sampling must be"):
        select_jsonl("classifier", cand, tgt, out, sampling="best")
    assert not out.exists()  # nothing written on any error


def test_write_jsonl_is_utf8(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    assert write_jsonl([{"prompt": "café ☕"}], path) == 1
    assert json.loads(path.read_text(encoding="utf-8")) == {"prompt": "café ☕"}
