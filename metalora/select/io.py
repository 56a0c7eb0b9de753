"""JSONL in and out for data selection: rows are JSON objects; a text is some of their fields joined.

Errors name the file and line: a malformed line, a line that is not a JSON object, a row without a
requested text field (with the fields it does have).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl", "read_texts", "row_text", "write_jsonl"]

PathLike = str | os.PathLike[str]


def _read_numbered(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); ``file:line`` in every error."""
    return [row for _, row in _read_numbered(path)]


def row_text(row: dict[str, Any], text_fields: Sequence[str], where: str = "row") -> str:
    """The row's ``text_fields`` joined by a newline; a missing or non-string field raises, listing the
    row's fields."""
    parts = []
    for name in text_fields:
        if name not in row:
            raise ValueError(
                f"{where}: no field {name!r} (text_fields={list(text_fields)}); available fields: {sorted(row)}"
            )
        value = row[name]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
        parts.append(value)
    return "\n".join(parts)


def read_texts(path: PathLike, text_fields: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, texts) of a JSONL file; each text is ``row_text(row, text_fields)``."""
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    if not text_fields:
        raise ValueError("text_fields must name at least one field")
    numbered = _read_numbered(path)
    texts = [row_text(row, text_fields, f"{path}:{line_no}") for line_no, row in numbered]
    return [row for _, row in numbered], texts


def write_jsonl(rows: Iterable[dict[str, Any]], path: PathLike) -> int:
    """Write one JSON object per line (UTF-8, parent folders created); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
