"""Read raw records (one ``dict`` per row) from JSONL, JSON, CSV, Parquet and HF ``datasets`` sources.

Every reader raises `MetaloraDataError` with the file (and the line, where there is one) at fault.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from metalora.data.errors import MetaloraDataError

FILE_FORMATS = ("jsonl", "json", "csv", "parquet", "hf")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "hf",
}


def infer_format(path: str | Path) -> str:
    """The file format of ``path`` from its extension; a directory is an HF ``datasets`` source."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    fmt = _EXTENSIONS.get(p.suffix.lower())
    if fmt is None:
        raise MetaloraDataError(
            f"cannot tell the format of {str(p)!r} from its extension; set file_format to one of {list(FILE_FORMATS)}"
        )
    return fmt


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a file that is not valid UTF-8 raises naming the file, line and byte."""
    p = Path(path)
    if not p.is_file():
        raise MetaloraDataError(f"data file not found: {str(p)!r}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MetaloraDataError(
            f"{p}:{line}: not valid UTF-8 (byte offset {e.start}: {e.reason}); re-encode the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; a malformed line raises with ``file:line``. Lines end at ``\n``
    only (``str.splitlines`` would also cut at U+2028 and other characters JSON strings may hold)."""
    records = []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetaloraDataError(
                f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise MetaloraDataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


def read_json(path: str | Path) -> list[dict[str, Any]]:
    """A JSON array of objects (or an object whose ``"data"`` key holds one)."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise MetaloraDataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise MetaloraDataError(f"{path}: expected a JSON array of objects (or {{'data': [...]}})")
    return obj


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """A CSV file with a header row; every value is a string. A row with extra cells raises ``file:line``."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    records = []
    for row in reader:
        if None in row:
            raise MetaloraDataError(
                f"{path}:{reader.line_num}: row has more cells than the header's {len(reader.fieldnames or [])}"
            )
        records.append(row)
    return records


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a Parquet file."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise MetaloraDataError(f"data file not found: {str(path)!r}")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise MetaloraDataError(f"{path}: cannot read as Parquet ({e})") from None


def read_hf(path: str | Path, split: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """An HF ``datasets`` source: a ``save_to_disk`` directory (``load_from_disk``) or anything
    ``datasets.load_dataset`` reads locally (a data directory, a loading script, an ``.arrow`` file).

    ``split`` picks the split of a ``DatasetDict``; it is required when there is more than one.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise MetaloraDataError(f"HF dataset path not found: {str(p)!r}")
    saved = p.is_dir() and any((p / f).exists() for f in ("state.json", "dataset_dict.json"))
    if saved:
        ds = datasets.load_from_disk(str(p))
    elif p.suffix == ".arrow":
        ds = datasets.Dataset.from_file(str(p))
    else:
        ds = datasets.load_dataset(str(p), name=name, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise MetaloraDataError(f"{p}: has splits {list(ds)}; set hf_split to pick one")
            split = next(iter(ds))
        if split not in ds:
            raise MetaloraDataError(f"{p}: no split {split!r}; available splits: {list(ds)}")
        ds = ds[split]
    return ds.to_list()


def read_records(
    path: str | Path,
    file_format: str | None = None,
    *,
    hf_split: str | None = None,
    hf_name: str | None = None,
) -> list[dict[str, Any]]:
    """Read ``path`` as ``file_format`` (inferred from the extension when ``None``) into a list of dicts."""
    fmt = file_format or infer_format(path)
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "json":
        return read_json(path)
    if fmt == "csv":
        return read_csv(path)
    if fmt == "parquet":
        return read_parquet(path)
    if fmt == "hf":
        return read_hf(path, split=hf_split, name=hf_name)
    raise MetaloraDataError(f"unknown file_format {fmt!r}; choose one of {list(FILE_FORMATS)}")
