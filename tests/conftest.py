import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

# Tests use tiny models whose ops are too small to gain from threads, and OpenMP threads that wait on a
# busy core make every op ~100x slower on a shared 2-core machine. One thread keeps the suite's time
# predictable; tests that run real models in a subprocess (the demo) use the default thread count.
torch.set_num_threads(1)


# --- skips in CI ----------------------------------------------------------------------------------------
# With CI set (CI=true), a skipped test is a failure naming the skip reason unless it is marked
# ``@pytest.mark.optional``: the dev install provides everything a core test needs (BBH files, lm-eval,
# the embedded models), so a core skip in CI means a broken install, not a test to pass over.


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("optional") is not None:
        return
    report.outcome = "failed"
    report.longrepr = f"core test skipped in CI (mark it optional if it may skip): {_skip_reason(report)}"


_SKIPPED_MODULES: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module skipped at import (``pytest.importorskip``) holds core tests too: in CI it is recorded and
    fails the session at the end (failing the collection itself would stop every other test)."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        _SKIPPED_MODULES.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for line in _SKIPPED_MODULES:
        terminalreporter.write_line(f"FAILED (core test module skipped in CI) {line}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED_MODULES and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
