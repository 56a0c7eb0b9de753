"""``scripts/python.sh``: the README's commands use a project ``.venv`` where the system Python refuses pip
(PEP 668), and plain ``python3`` elsewhere. Oracle: the interpreter it prints, and the environment it made."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "python.sh"


def _run(root: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    return subprocess.run(
        ["bash", str(root / "scripts" / "python.sh")],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
    )


def _project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "scripts" / "python.sh")
    return tmp_path


def test_an_externally_managed_python_gets_a_project_venv_once(tmp_path):
    root = _project(tmp_path)
    first = _run(root, METALORA_EXTERNALLY_MANAGED="1")
    venv_python = root / ".venv" / "bin" / "python"
    assert first.stdout.strip() == str(venv_python) and venv_python.is_file()
    assert "source .venv/bin/activate" in first.stderr
    version = subprocess.run([str(venv_python), "-m", "pip", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and str(root / ".venv") in version.stdout  # pip installs into the venv
    again = _run(root, METALORA_EXTERNALLY_MANAGED="1")
    assert again.stdout.strip() == str(venv_python) and "created" not in again.stderr


def test_a_python_that_accepts_pip_or_an_active_environment_is_used_as_it_is(tmp_path):
    root = _project(tmp_path)
    assert _run(root, METALORA_EXTERNALLY_MANAGED="0").stdout.strip() == "python3"
    assert _run(root, METALORA_EXTERNALLY_MANAGED="1", VIRTUAL_ENV="/some/env").stdout.strip() == "python3"
    assert not (root / ".venv").exists()
