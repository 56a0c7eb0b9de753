"""Shared helpers for the benchmarks: timing with interleaved repeats, memory accounting, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def interleaved_medians(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin so drift hits all of them alike.

    ``clock=time.process_time`` measures this process's CPU time instead of wall time: on a shared
    machine with one intra-op thread, that is the work itself rather than the neighbours."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class SavedTensorBytes:
    """Bytes autograd saves for backward during a forward (activation memory), counted exactly."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux ≥ 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM from /proc (resettable), else ru_maxrss (the whole process lifetime)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-markdown table."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table of already formatted cells (the doc tables printed from stored JSON)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def generated(command: str, name: str, body: str) -> str:
    """``body`` (a table printed from stored JSON) under the HTML comment the doc marks it with."""
    return f"<!-- generated: {command} (table {name}); do not edit by hand -->\n{body}"


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run_in_fresh_process(module: str, function: str, *args: Any, env: dict[str, str] | None = None) -> Any:
    """``benchmarks/<module>.py``'s ``function(*args)`` in a new Python process; its JSON-able result.

    Peak memory is per process, so each variant is measured in a process of its own."""
    code = (
        f"import json, sys; sys.path.insert(0, 'benchmarks'); from {module} import {function}; "
        f"print(json.dumps({function}(*{args!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_or_print(
    markdown_only: bool,
    store: Path,
    measure: Callable[[], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """A benchmark's ``main``: unless ``--markdown``, measure and store the JSON; then print the docs table,
    always from the stored JSON (so the docs show what the file holds, never a number typed by hand)."""
    if not markdown_only:
        store.write_text(json.dumps(measure(), indent=2) + "\n")
    print(markdown(json.loads(store.read_text())))
