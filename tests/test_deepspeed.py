"""DeepSpeed ZeRO-2/3 (``train.sharding: zero2 | zero3``) over two CPU processes (gloo) equals one process.

The file is also the worker: ``torchrun --nproc_per_node 2 tests/test_deepspeed.py PART OUT``. Part ``runs``
trains LoRA-MT under ZeRO-2 and ZeRO-3 (plain LoRA; an uneven batch of 5 cut into micro-batches of 2, so the
ranks run different numbers of passes and the engine pads them; clipping at 0.5 and a cosine schedule, so
DeepSpeed's clip and the engine's schedule are both exercised) and task-routed MTL-LoRA under ZeRO-2 (a
tensor unused on one rank), checks that MeTA-LoRA and reweighting refuse ZeRO, and kills a ZeRO-3 LoRA-MT run
(``os._exit``) right after its step-2 checkpoint. Part ``resume`` is started by ``accelerate launch
--config_file`` with ``configs/accelerate/zero3.yaml`` (and ``train.sharding: none``: the launcher's env
selects ZeRO-3): it resumes the killed run, and a one-process run from its step-2 checkpoint.

Oracle: the same runs in this (single) process, unsharded. DeepSpeed keeps an fp32 master copy, so the tiny
models are fp32 and the runs agree to fp32 rounding (TOL; observed ~1e-8), where FSDP's float64 runs agree to
1e-16 (``test_fsdp.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import test_fsdp as fsdp
import torch
import yaml
from test_fsdp import diff, free_port, kill_after_checkpoint, launch, rewind, saved, state

from metalora.train import checkpoint as ckpt
from metalora.train.sharding import Sharding, ShardingError, resolve

pytest.importorskip(
    "deepspeed", reason="DeepSpeed is an optional backend (scripts/install.sh --dev installs it)"
)

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def adapter(kind: str) -> torch.nn.Module:
    return fsdp.adapter(kind, torch.float32)


def run_mt(run_dir: Path, kind: str, sharding: str = "none", **kw) -> torch.nn.Module:
    """``test_fsdp.run_mt`` in fp32, with a cosine schedule (the engine's, driving DeepSpeed's optimizer)."""
    return fsdp.run_mt(run_dir, kind, sharding, dtype=torch.float32, **{"schedule": "cosine", **kw})


def refusals(out: Path, sharding: str) -> None:
    """MeTA-LoRA and reweighting under ZeRO: each error's text, written for the test to read."""
    for name, run in (("meta", fsdp.run_meta), ("reweight", fsdp.run_reweight)):
        try:
            run(out / name, sharding)
        except ShardingError as exc:
            (out / f"{name}_error.txt").write_text(str(exc))


def worker(part: str, out: Path) -> None:
    from metalora.train import distributed

    if part == "runs":
        run_mt(out / "zero2_lora", "lora", "zero2")
        run_mt(out / "zero3_lora", "lora", "zero3")
        run_mt(out / "zero2_mtl", "mtl", "zero2")
        refusals(out, "zero3")
        kill_after_checkpoint(2)
        run_mt(out / "killed", "lora", "zero3")
        raise AssertionError("the killed run went past its checkpoint")
    assert part == "resume" and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true", part
    run_mt(out / "killed", "lora")  # train.sharding: none, the launcher's env says ZeRO-3
    run_mt(out / "from_one", "lora")
    assert distributed.world_size() == 2


# --- the tests ----------------------------------------------------------------------------------------


def torchrun(part: str, out: Path) -> str:
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return launch([*runner, "--master_port", str(free_port()), __file__, part, str(out)], out)


def accelerate_zero3(part: str, out: Path) -> str:
    """``accelerate launch --config_file`` with the repository's ZeRO-3 config, 2 processes on this machine."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    config.update(num_processes=2, main_process_port=free_port())
    path = out / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    return launch([*runner, __file__, part, str(out)], out)


def assert_same_run(two: Path, one_model: torch.nn.Module, one: Path, kind: str) -> None:
    fsdp.assert_same_run(two, one_model, one, kind, tol=TOL, rel=1e-5)  # fp32 rounding


@pytest.mark.slow
def test_zero_two_processes_equal_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    log = torchrun("runs", two)
    assert "metalora: sharding=zero3 (DeepSpeed ZeRO-3 over 2 processes) from train.sharding" in log
    counters = json.loads((two / "zero3_lora" / "counters.json").read_text())
    assert (counters["sharding"], counters["world_size"]) == ("zero3", 2)
    lora = run_mt(one / "lora", "lora")
    assert_same_run(two / "zero2_lora", lora, one / "lora", "lora")
    assert_same_run(two / "zero3_lora", lora, one / "lora", "lora")
    assert_same_run(two / "zero2_mtl", run_mt(one / "mtl", "mtl"), one / "mtl", "mtl")
    for name in ("meta", "reweight"):
        error = (two / f"{name}_error.txt").read_text()
        assert "is not supported with DeepSpeed ZeRO" in error, error

    # the killed ZeRO-3 run: its step-2 checkpoint, full tensors in the unsharded format, resumes here
    assert ckpt.latest(two / "killed" / "checkpoints").name == ckpt.step_dir_name(2)
    shutil.copytree(two / "killed", tmp_path / "killed_one")
    resumed = run_mt(tmp_path / "killed_one", "lora")
    assert diff(state(resumed), state(lora)) < TOL

    # and resumes under ZeRO-3 from accelerate launch's DeepSpeed config; so does a one-process checkpoint
    shutil.copytree(one / "lora", two / "from_one")
    rewind(two / "from_one", 2)
    log = accelerate_zero3("resume", two)
    assert "from accelerate launch's DeepSpeed config" in log
    for name in ("killed", "from_one"):
        assert diff(saved(two / name), state(lora)) < TOL, name
        assert json.loads((two / name / "counters.json").read_text())["sharding"] == "zero3"


def test_accelerate_env_selects_zero(tmp_path):
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert resolve("none", env) == Sharding("zero3", "accelerate")
    assert resolve("zero2", {}) == Sharding("zero2", "config")
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert resolve("none", {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)}).mode == "zero2"
    with pytest.raises(ShardingError, match="stage '1'"):
        resolve("none", {**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    with pytest.raises(ShardingError, match="offload is not supported"):
        resolve("none", {**env, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})
    file.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    with pytest.raises(ShardingError, match="offload is not supported"):
        resolve("none", {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)})


def test_one_process_ignores_zero(tmp_path):
    """``sharding: zero3`` in one process is the unsharded run (nothing to partition over)."""
    zero = run_mt(tmp_path / "zero", "lora", "zero3", max_steps=2)
    plain = run_mt(tmp_path / "plain", "lora", max_steps=2)
    assert diff(state(zero), state(plain)) == 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(sys.argv[1], Path(sys.argv[2]))
