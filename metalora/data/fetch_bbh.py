"""``python -m metalora.data.fetch_bbh``: fetch BBH's source task files once (the dev install runs it).

Downloads the ``bigbench==1.0.0`` sdist with pip (never installs it: it pulls tensorflow) and unpacks only
the task files ``metalora.data.bbh`` reads into metalora's cache. Its own module, which the package does
not import, so that ``python -m`` runs it without runpy's double-import warning.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from metalora.data.bbh import ALIASES, BBH_TASKS, BIGBENCH_SDIST, UNBUILDABLE, cache_root


def unpack_task_files(sdist: Path, staging: Path, names: list[str]) -> None:
    """Write the ``benchmark_tasks/<task>/**/task.json`` files of ``sdist`` whose task is among ``names``
    into ``staging``; a member whose path climbs out (``..``, absolute) or is not a regular file is skipped."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if "benchmark_tasks" not in parts or not member.isfile() or parts[-1] != "task.json":
                continue
            rel = Path(*parts[parts.index("benchmark_tasks") + 1 :])
            if ".." in rel.parts or rel.is_absolute():  # a member may not write outside the cache
                continue
            top = rel.parts[0]
            if not any(n == top or n.startswith(top + "_") for n in names):
                continue
            source = tar.extractfile(member)
            assert source is not None
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())


def install(dest: Path | None = None) -> Path:
    """Download the ``bigbench`` sdist with pip (no install, no dependencies) and unpack only the BBH task
    files into ``dest`` (default: metalora's cache); a no-op when they are there."""
    dest = dest or cache_root()
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    names = [ALIASES.get(t, t) for t in BBH_TASKS if t not in UNBUILDABLE]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                BIGBENCH_SDIST,
                "-d",
                tmp,
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("bigbench-*.tar.gz"))
        staging = Path(tmp) / "unpacked"
        unpack_task_files(sdist, staging, names)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(staging, dest)
    marker.write_text(BIGBENCH_SDIST + "\n")
    return dest


if __name__ == "__main__":
    print(f"BBH task files in {install()}")
