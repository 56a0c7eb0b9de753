"""Security review (issue 14 item 9), kept true by tests: no pickle, no remote code, no file written or read
outside where it belongs. The adapter file's shape/dtype/key checks are in ``test_adapters_export.py``.

Oracles: a scan of every Python file of the repository's source trees (the call's arguments as parsed by
``ast``), and crafted inputs that name paths outside their directory."""

from __future__ import annotations

import ast
import inspect
import io
import tarfile
from pathlib import Path

import pytest

from metalora.data import MetaloraDataError, load_task
from metalora.data.fetch_bbh import unpack_task_files
from metalora.models import load_base
from metalora.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TREES = ("metalora", "benchmarks", "tests", "scripts")


def _calls() -> list[tuple[str, ast.Call]]:
    """Every call in the repository's Python files, with ``file:line``."""
    out = []
    for tree in SOURCE_TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            module = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            rel = path.relative_to(ROOT)
            out += [(f"{rel}:{n.lineno}", n) for n in ast.walk(module) if isinstance(n, ast.Call)]
    return out


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return None


def test_no_pickle_and_no_remote_code_anywhere():
    """``torch.load`` only with ``weights_only=True``; no ``pickle``/``numpy.load(allow_pickle=True)``/
    ``yaml.load``; ``trust_remote_code`` never passed as a literal True, and where it is passed on, it comes
    from the run config or ``load_base``'s own parameter, both False unless set. Shown to fail on a planted
    ``torch.load(path)`` in a test file."""
    bad = []
    for where, call in _calls():
        name = _dotted(call.func)
        if name == "torch.load" and _keyword(call, "weights_only") is not True:
            bad.append(f"{where}: torch.load without weights_only=True")
        if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.")) or name in (
            "yaml.load",
            "yaml.unsafe_load",
        ):
            bad.append(f"{where}: {name}")
        if _keyword(call, "allow_pickle") not in (None, False):
            bad.append(f"{where}: allow_pickle")
        remote = _keyword(call, "trust_remote_code")
        if remote not in (None, False) and not _passes_on_the_setting(call):
            bad.append(f"{where}: trust_remote_code")
    assert not bad, bad
    assert inspect.signature(load_base).parameters["trust_remote_code"].default is False
    assert RunConfig.__dataclass_fields__["trust_remote_code"].default is False


def _passes_on_the_setting(call: ast.Call) -> bool:
    """``trust_remote_code=cfg.trust_remote_code`` (the run config's key) or ``=trust_remote_code`` (a
    parameter passed on); a literal True or any other expression is not allowed."""
    value = next(kw.value for kw in call.keywords if kw.arg == "trust_remote_code")
    if isinstance(value, ast.Attribute):
        return (
            value.attr == "trust_remote_code"
            and isinstance(value.value, ast.Name)
            and value.value.id == "cfg"
        )
    return isinstance(value, ast.Name) and value.id == "trust_remote_code"


def _tar_with(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bbh_unpacking_writes_only_inside_its_directory(tmp_path):
    """Oracle: the files that exist afterwards. A member that climbs out with ``..`` is skipped; the real
    one is written. Shown to fail without the ``..`` check (the climbing member was written to
    ``tmp_path/escaped/task.json``)."""
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    sdist = _tar_with(
        tmp_path,
        {
            f"{root}/navigate/task.json": b"{}",
            f"{root}/navigate/../../../escaped/task.json": b"{}",  # staging/navigate/../../.. = tmp_path
        },
    )
    staging = tmp_path / "cache" / "unpacked"
    unpack_task_files(sdist, staging, ["navigate"])
    assert (staging / "navigate" / "task.json").is_file()
    assert not any(tmp_path.rglob("escaped")), sorted(tmp_path.rglob("*"))


@pytest.mark.parametrize("builtin", ["bbh:../../etc", "bbh:date_understanding/../x"])
def test_a_bbh_name_outside_bbhs_tasks_is_refused(builtin):
    """Oracle: the error names the task before any file is looked up (a ``..`` name would otherwise read a
    ``task.json`` outside the cache)."""
    with pytest.raises(MetaloraDataError, match="expected a BIG-bench task name"):
        load_task({"name": "t", "builtin": builtin})
