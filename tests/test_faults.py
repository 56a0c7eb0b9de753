"""Fault injection, CI's quick version of ``benchmarks/faults.py``: training runs killed with SIGKILL at
random moments (checkpoints every step, so kills land inside checkpoint writes too), then resumed.

Oracle: an uninterrupted run of the same recipe; every resumed run's adapters must be byte-identical and
its metrics equal (wall-clock fields and resume events aside). LoRA-MT, LoRA-ST, MeTA-LoRA and
reweighting in one process; LoRA-MT and MeTA-LoRA also in two (torchrun, gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"


def test_killed_runs_resume_bit_identically(tmp_path):
    out = tmp_path / "faults.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--kills", "1", "--quick", "--steps", "8"]
    proc = subprocess.run(
        [*cmd, "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = {(r["algorithm"], r["processes"]) for r in result["rows"]}
    assert cases == {
        ("lora_mt", 1),
        ("lora_st", 1),
        ("meta", 1),
        ("reweight", 1),
        ("lora_mt", 2),
        ("meta", 2),
    }
    for row in result["rows"]:
        assert row["identical"] == row["trials"] == 1, row
    assert result["totals"]["kills"] >= 4, "most trials should have killed a run that was still training"
