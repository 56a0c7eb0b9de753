"""Nothing is lost: checkpoint checksums, a failed checkpoint write, one writer per run directory, and
SIGINT/SIGTERM finishing the step with a checkpoint.

Oracles: an uninterrupted run's adapter (bit-identical after resume), the previous checkpoint's bytes
(unchanged after a failed write), exit statuses 143/130 and the lock's error naming the holder.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_engine import run_mt
from test_train_utils import adapter_state, max_abs_diff

from metalora import atomic
from metalora.errors import CheckpointError, RunDirInUse
from metalora.rundir import RunDir
from metalora.train import checkpoint


def _checkpoint_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_manifest_detects_truncation_and_corruption_and_resume_uses_the_one_before(tmp_path, capsys):
    full, _ = run_mt(tmp_path / "full", steps=6, checkpoint_every=2)
    run_mt(tmp_path / "cut", steps=4, checkpoint_every=2)  # checkpoints at steps 2 and 4
    root = tmp_path / "cut" / "checkpoints"
    checkpoint.verify(root / "step-00000004")  # a good checkpoint verifies
    state = root / "step-00000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-7])  # truncated
    with pytest.raises(CheckpointError, match=r"state.safetensors is truncated"):
        checkpoint.verify(root / "step-00000004")
    adapter = root / "step-00000004" / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    state.write_bytes(state.read_bytes() + b"1234567")  # (restore the size so the adapter is the problem)
    adapter.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"adapter.safetensors is corrupted"):
        checkpoint.verify(root / "step-00000004")
    found, problems = checkpoint.latest_valid(root)
    assert found == root / "step-00000002" and "step-00000004" in problems[0]
    # resuming the 6-step run skips the damaged step 4, restarts from step 2 and ends where an
    # uninterrupted run ends
    resumed, counters = run_mt(tmp_path / "cut", steps=6, checkpoint_every=2)
    assert "skipping a damaged checkpoint" in capsys.readouterr().err
    assert max_abs_diff(adapter_state(resumed), adapter_state(full)) == 0.0 and counters.optimizer_steps == 6
    events = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "skipped_checkpoint" for e in events)


def test_no_verifiable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    run_mt(tmp_path / "r", steps=2, checkpoint_every=1, keep_checkpoints=1)
    (tmp_path / "r" / "checkpoints" / "step-00000002" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* verifies"):
        run_mt(tmp_path / "r", steps=4)


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops(tmp_path, monkeypatch):
    run_mt(tmp_path / "r", steps=2, checkpoint_every=2)
    root = tmp_path / "r" / "checkpoints"
    before = _checkpoint_bytes(root / "step-00000002")
    real = atomic.write_safetensors

    def disk_full(path, tensors, metadata=None):
        if Path(path).name == "adapter.safetensors" and ".tmp-step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(atomic, "write_safetensors", disk_full)
    with pytest.raises(
        CheckpointError, match=r"step-00000004 failed \(No space left on device\).*step-00000002 is intact"
    ):
        run_mt(tmp_path / "r", steps=6, checkpoint_every=2)
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert _checkpoint_bytes(root / "step-00000002") == before
    assert not (root / ".tmp-step-00000004").exists() and not (root / "step-00000004").exists()
    checkpoint.verify(root / "step-00000002")


def test_one_writer_per_run_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock():
        with pytest.raises(RunDirInUse, match=rf"{tmp_path / 'r'} is in use .*pid {os.getpid()}"):
            with RunDir(tmp_path / "r").lock():
                pass
    with run.lock():  # released on exit
        pass
    # released on a crash: a process killed while holding it leaves no stale lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metalora.rundir import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(60)", str(run.root)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirInUse, match=rf"pid {holder.pid}"):
        with run.lock():
            pass
    holder.kill()
    holder.wait()
    with run.lock():
        pass


SLOW_RUN = """
import sys, time
from test_train_engine import run_mt
from metalora.train import multitask
original = multitask.EpochBatches.sample
def slow(self):  # give the test time to signal mid-run
    time.sleep(0.3)
    return original(self)
multitask.EpochBatches.sample = slow
print("started", flush=True)
try:
    run_mt(sys.argv[1], steps=int(sys.argv[2]), checkpoint_every=100)
except Exception as exc:
    print(type(exc).__name__, exc, file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", 1))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_the_run_resumes(tmp_path, signum):
    full, _ = run_mt(tmp_path / "full", steps=8)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(tmp_path / "cut"), "8"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "started"
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while not metrics.is_file() or not metrics.read_text().strip():  # wait for step 1
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name} after step" in err
    saved = checkpoint.latest(tmp_path / "cut" / "checkpoints")
    step = int(saved.name.split("-")[1])
    assert 1 <= step < 8, "the signal came before the run could finish"
    status = json.loads((tmp_path / "cut" / "counters.json").read_text())
    assert status["status"].startswith("interrupted") and status["optimizer_steps"] == step
    resumed, counters = run_mt(tmp_path / "cut", steps=8)  # running again resumes
    assert max_abs_diff(adapter_state(resumed), adapter_state(full)) == 0.0 and counters.optimizer_steps == 8


def test_a_checkpoint_of_another_shape_is_refused_naming_the_tensor(tmp_path):
    """Oracle: a checkpoint whose manifest verifies but whose adapter tensor has another shape (a run
    resumed with another rank, say) stops with a CheckpointError naming that tensor, not a traceback."""
    from safetensors.torch import load_file, save_file

    run_mt(tmp_path / "r", steps=2, checkpoint_every=2)
    step = tmp_path / "r" / "checkpoints" / "step-00000002"
    tensors = load_file(str(step / "adapter.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, str(step / "adapter.safetensors"))
    atomic.write_json(step / "manifest.json", checkpoint.manifest(step))
    with pytest.raises(CheckpointError, match=rf"does not fit this run's adapter.*{name}"):
        run_mt(tmp_path / "r", steps=4)
