"""Two CPU processes take the same steps as one process, launched by torchrun (gloo) and by accelerate.

Note: in accelerate 1.15 ``accelerate launch --num_processes 2 --cpu`` starts ONE process (its simple
launcher; several CPU processes need an MPI hostfile). On a machine without GPUs,
``accelerate launch --multi_gpu --num_processes 2`` starts two gloo processes; so does torchrun.

MeTA-LoRA splits each iteration's tasks across the ranks and all-reduces the query gradients; LoRA-MT
splits each global batch. Oracle: the same runs in this (single) process. Float64 tiny models, so the
only difference, the order of the gradient sums, stays far below the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train_utils import adapter_state, max_abs_diff

import metalora as ml
from metalora.testing import tiny_model

TESTS = Path(__file__).resolve().parent

WORKER = textwrap.dedent(
    """
    import sys, json
    sys.path[:0] = {paths!r}
    from test_distributed_case import run_meta, run_mt
    from metalora.train import distributed
    out = sys.argv[1]
    run_meta(out + "/meta")
    run_mt(out + "/mt")
    assert distributed.world_size() == 2, distributed.world_size()
    """
)

CASE = textwrap.dedent(
    """
    import torch
    import metalora as ml
    from metalora.data import EpisodicSampler
    from metalora.train import EngineConfig, MetaConfig, MultitaskConfig, train_meta, train_multitask
    from test_train_utils import PAD, make_pools
    from metalora.testing import tiny_model

    def engine_config():
        return EngineConfig(max_steps=3, lr=1e-2, device="cpu", checkpoint_every=2, progress=False, seed=5)

    def run_meta(run_dir):
        model = ml.add_adapter(tiny_model(dtype=torch.float64), ml.MTLLoRAConfig(r=4, num_tasks=3))
        cfg = MetaConfig(n_tasks=2, inner_steps=2, support_size=2, query_size=2, inner_lr=0.1)
        sampler = EpisodicSampler(make_pools(length=8, vary=True), 2, 2, 2, seed=3)
        return model, train_meta(model, sampler, cfg, engine_config(), run_dir, PAD)

    def run_mt(run_dir):
        model = ml.add_adapter(tiny_model(dtype=torch.float64), ml.LoRAConfig(r=4))
        features = sum(make_pools(length=8, vary=True).values(), [])
        cfg = MultitaskConfig(batch_size=6, micro_batch_size=2, seed=1)
        names = ["t0", "t1", "t2"]
        return model, train_multitask(model, features, cfg, engine_config(), run_dir, PAD, task_names=names)
    """
)


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


def tiny_model_adapter(name):
    cfg = ml.MTLLoRAConfig(r=4, num_tasks=3) if name == "meta" else ml.LoRAConfig(r=4)
    return ml.add_adapter(tiny_model(dtype=torch.float64), cfg)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one(tmp_path, launcher):
    if launcher == "accelerate" and torch.cuda.is_available():
        pytest.skip("--multi_gpu starts CPU processes only on a machine without GPUs")
    case = tmp_path / "case"
    case.mkdir()
    (case / "test_distributed_case.py").write_text(CASE)
    worker = case / "worker.py"
    worker.write_text(WORKER.format(paths=[str(TESTS), str(case)]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [*LAUNCHERS[launcher], str(worker), str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sys.path.insert(0, str(case))
    try:
        from test_distributed_case import run_meta, run_mt
    finally:
        sys.path.remove(str(case))
    for name, runner in (("meta", run_meta), ("mt", run_mt)):
        model, counters = runner(str(tmp_path / "one" / name))
        two = ml.load_adapter(tiny_model(dtype=torch.float64), tmp_path / "two" / name / "adapter")
        assert max_abs_diff(adapter_state(two), adapter_state(model)) < 1e-10, name
        assert (
            max_abs_diff(adapter_state(model), adapter_state(tiny_model_adapter(name))) > 1e-3
        )  # it trained
        two_ckpt = sorted((tmp_path / "two" / name / "checkpoints").glob("step-*/rng-rank*.json"))
        assert len(two_ckpt) == 4, two_ckpt  # 2 checkpoints x 2 ranks
        saved = json.loads((tmp_path / "two" / name / "counters.json").read_text())
        assert (saved["optimizer_steps"], saved["samples"]) == (counters.optimizer_steps, counters.samples)
    # per-task losses of mixed batches are summed over ranks: the 2-process log equals the 1-process one
    logs = {
        k: [json.loads(line) for line in (tmp_path / k / "mt" / "metrics.jsonl").read_text().splitlines()]
        for k in ("one", "two")
    }
    per_task = [{k: v for k, v in rec.items() if k.startswith("loss")} for rec in logs["one"]]
    assert any(len(rec) > 2 for rec in per_task)  # mixed batches log several tasks
    for one, two in zip(per_task, logs["two"], strict=True):
        assert one == pytest.approx({k: two[k] for k in one}, rel=1e-9)
