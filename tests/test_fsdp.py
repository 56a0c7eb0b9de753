"""Sharded training (``train.sharding: fsdp``, torch FSDP2) over two CPU processes (gloo) equals one process.

The file is also the worker: ``torchrun --nproc_per_node 2 tests/test_fsdp.py PART OUT``. Part ``runs``
trains LoRA-MT (plain LoRA and task-routed MTL-LoRA; an uneven batch of 5 cut into micro-batches of 2, so
the ranks run different numbers of passes and the engine pads them; MTL-LoRA with gradient checkpointing,
so task routing is also exercised in FSDP's recompute), MeTA-LoRA (MTL-LoRA; |S| = 3 split
over 2 ranks) and a LoRA-MT run killed (``os._exit``) right after its step-2 checkpoint; it also checks that
reweighting refuses sharding. Part ``resume`` is started by ``accelerate launch --config_file`` with
``configs/accelerate/fsdp2.yaml`` (and ``train.sharding: none``: the launcher's FSDP env selects it); it
resumes the killed run, and a one-process run from its step-2 checkpoint.

Oracle: the same runs in this (single) process, unsharded. Float64 tiny models: the only difference, the
order of the sums over ranks and micro-batches, leaves the adapters within 1e-10 (observed ~1e-16).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.data import EpisodicSampler
from metalora.testing import tiny_model
from metalora.train import EngineConfig, MetaConfig, MultitaskConfig, train_meta, train_multitask
from metalora.train import checkpoint as ckpt
from metalora.train.engine import Engine, EngineConfigError
from metalora.train.reweight import ReweightConfig, train_reweight
from metalora.train.sharding import Sharding, ShardingError, resolve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOL = 1e-10
NAMES = ["t0", "t1", "t2"]


def engine_config(sharding: str = "none", **kw) -> EngineConfig:
    base = {"max_steps": 4, "lr": 1e-2, "device": "cpu", "checkpoint_every": 2, "progress": False, "seed": 5}
    return EngineConfig(**{**base, "max_grad_norm": 0.5, "sharding": sharding, **kw})


def adapter(kind: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    cfg = ml.MTLLoRAConfig(r=4, num_tasks=3, task_names=NAMES) if kind == "mtl" else ml.LoRAConfig(r=4)
    return ml.add_adapter(tiny_model(dtype=dtype), cfg)


def run_mt(
    run_dir: Path, kind: str, sharding: str = "none", dtype: torch.dtype = torch.float64, **kw
) -> torch.nn.Module:
    from test_train_utils import PAD, make_pools  # tests/ is on sys.path in pytest and the worker alike

    model = adapter(kind, dtype)
    features = sum(make_pools(length=8, vary=True).values(), [])
    cfg = MultitaskConfig(batch_size=5, micro_batch_size=2, seed=1)
    train_multitask(model, features, cfg, engine_config(sharding, **kw), run_dir, PAD, task_names=NAMES)
    return model


def run_meta(run_dir: Path, sharding: str = "none") -> torch.nn.Module:
    from test_train_utils import PAD, make_pools

    model = adapter("mtl")
    cfg = MetaConfig(n_tasks=2, inner_steps=2, support_size=3, query_size=2, inner_lr=0.1)
    sampler = EpisodicSampler(make_pools(length=8, vary=True), 2, 3, 2, seed=3)
    train_meta(model, sampler, cfg, engine_config(sharding, max_steps=3), run_dir, PAD)
    return model


def run_reweight(run_dir: Path, sharding: str) -> None:
    from test_train_utils import PAD, make_features

    model = adapter("lora")
    train, val = make_features("tr", 0, 8, length=8, seed=5), make_features("va", 0, 4, length=8, seed=6)
    config = ReweightConfig.from_dict({"batch_size": 4, "val_batch_size": 2})
    train_reweight(model, train, val, config, engine_config(sharding, max_steps=1), run_dir, PAD)


def kill_after_checkpoint(step: int) -> None:
    """Make the process die (no clean-up, like a kill) right after checkpoint ``step`` is written."""
    save = Engine.save_checkpoint

    def save_then_die(self, done, *args, **kwargs):
        path = save(self, done, *args, **kwargs)
        if done == step:
            os._exit(0)
        return path

    Engine.save_checkpoint = save_then_die


def worker(part: str, out: Path) -> None:
    from metalora.train import distributed

    if part == "runs":
        run_mt(out / "mt_lora", "lora", "fsdp")
        run_mt(out / "mt_mtl", "mtl", "fsdp", gradient_checkpointing=True)  # routed recompute, too
        run_meta(out / "meta", "fsdp")
        try:
            run_reweight(out / "reweight", "fsdp")
        except ShardingError as exc:
            (out / "reweight_error.txt").write_text(str(exc))
        kill_after_checkpoint(2)
        run_mt(out / "killed", "lora", "fsdp")
        raise AssertionError("the killed run went past its checkpoint")
    assert part == "resume" and os.environ.get("ACCELERATE_USE_FSDP") == "true", part
    run_mt(out / "killed", "lora")  # train.sharding: none, the launcher's env says FSDP
    run_mt(out / "from_one", "lora")
    assert distributed.world_size() == 2


# --- the tests ----------------------------------------------------------------------------------------


def launch(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(part: str, out: Path) -> str:
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return launch([*runner, "--master_port", str(free_port()), __file__, part, str(out)], out)


def accelerate_fsdp(part: str, out: Path) -> str:
    """``accelerate launch --config_file`` with the repository's FSDP2 config, 2 processes on this machine."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    config.update(num_processes=2, main_process_port=free_port(), use_cpu=False)
    path = out / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    return launch([*runner, __file__, part, str(out)], out)


def saved(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter.safetensors"))


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_parameters(model).items()}


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def assert_same_run(
    two: Path, one_model: torch.nn.Module, one: Path, kind: str, tol: float = TOL, rel: float = 1e-9
) -> None:
    assert diff(saved(two), state(one_model)) < tol, two.name
    assert diff(state(one_model), state(adapter(kind))) > 1e-3  # it trained
    for a, b in zip(records(two), records(one), strict=True):  # losses and the global (clipped) grad norm
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), two.name
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel), two.name


def rewind(run_dir: Path, step: int) -> None:
    """Make a finished run look killed right after checkpoint ``step``."""
    root = run_dir / "checkpoints"
    for later in root.glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (root / ckpt.LATEST).write_text(ckpt.step_dir_name(step) + "\n")
    shutil.rmtree(run_dir / "adapter")


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    log = torchrun("runs", two)
    assert "metalora: sharding=fsdp (FSDP2 fully_shard over 2 processes) from train.sharding" in log
    counters = json.loads((two / "mt_lora" / "counters.json").read_text())
    assert (counters["sharding"], counters["world_size"]) == ("fsdp", 2)
    for kind in ("lora", "mtl"):
        assert_same_run(two / f"mt_{kind}", run_mt(one / f"mt_{kind}", kind), one / f"mt_{kind}", kind)
    assert_same_run(two / "meta", run_meta(one / "meta"), one / "meta", "mtl")
    error = (two / "reweight_error.txt").read_text()
    assert "META-LoRA reweight is not supported with sharding" in error, error

    # the killed sharded run: its step-2 checkpoint, full tensors in the unsharded format, resumes here
    assert ckpt.latest(two / "killed" / "checkpoints").name == ckpt.step_dir_name(2)
    assert not (two / "killed" / "adapter").exists()
    shutil.copytree(two / "killed", tmp_path / "killed_one")
    resumed = run_mt(tmp_path / "killed_one", "lora")
    assert diff(state(resumed), saved(two / "mt_lora")) < TOL

    # and resumes sharded, under accelerate launch's FSDP2 config; so does a one-process checkpoint
    shutil.copytree(one / "mt_lora", two / "from_one")
    rewind(two / "from_one", 2)
    log = accelerate_fsdp("resume", two)
    assert "from accelerate launch's FSDP config" in log
    for name in ("killed", "from_one"):
        assert diff(saved(two / name), saved(two / "mt_lora")) < TOL, name
        assert json.loads((two / name / "counters.json").read_text())["sharding"] == "fsdp"


def test_accelerate_env_selects_fsdp():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    assert resolve("none", env) == Sharding("fsdp", "accelerate", reshard_after_forward=False)
    assert resolve("none", {}) == Sharding("none", "config")
    assert resolve("fsdp", {"ACCELERATE_USE_FSDP": "false"}) == Sharding("fsdp", "config")
    with pytest.raises(EngineConfigError, match="train.sharding='zero1'"):
        EngineConfig(sharding="zero1")  # DeepSpeed: test_deepspeed.py


def test_one_process_ignores_sharding(tmp_path):
    """``sharding: fsdp`` in one process is the unsharded run (nothing to shard over)."""
    fsdp = run_mt(tmp_path / "fsdp", "lora", "fsdp", max_steps=2)
    plain = run_mt(tmp_path / "plain", "lora", max_steps=2)
    assert diff(state(fsdp), state(plain)) == 0
    assert "sharding" not in json.loads((tmp_path / "fsdp" / "counters.json").read_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(sys.argv[1], Path(sys.argv[2]))
