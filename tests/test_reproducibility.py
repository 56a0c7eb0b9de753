"""The same recipe gives the same bits in a new process (CPU fp32).

torch seeds its default generator randomly in every process, so anything drawn from it before the run
seeds it (the adapter's initial A, MTL-LoRA's task logits) differed between two ``metalora train`` calls
of one recipe. Oracle: two fresh processes, which run the recipes in opposite orders (so neither the
process's random seed nor what ran before in it can matter), write byte-identical adapters and
``metrics.jsonl`` records equal in every field but the wall-clock ones.

Shown to fail on the bug: with ``add_adapter``'s ``seed`` dropped in the runner, every recipe's adapter
differs between the two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_run import _tasks, _tiny_base

import metalora as ml

WALL_CLOCK = {"step_time_s", "samples_per_s", "tokens_per_s", "wall_time_s", "time"}


def _recipes(tmp_path: Path) -> dict[str, dict]:
    _tiny_base(tmp_path / "base")
    tasks = _tasks(tmp_path)
    base = {
        "model": str(tmp_path / "base"),
        "data": {"tasks": tasks, "examples_per_task": 20, "max_length": 16},
        "train": {"max_steps": 3, "lr": 1e-2, "progress": False, "seed": 7},
    }
    dropout = {"r": 4, "dropout": 0.1}  # dropout draws from the global RNG every step
    return {
        "meta": {**base, "algorithm": "meta", "adapter": {"type": "mtl_lora", **dropout},
                 "meta": {"support_size": 4, "query_size": 4, "inner_lr": 1e-2, "seed": 3}},
        "lora_mt": {**base, "algorithm": "lora_mt", "adapter": {"type": "lora", **dropout},
                    "multitask": {"batch_size": 10, "seed": 3}},
        "lora_st": {**base, "algorithm": "lora_st", "adapter": {"type": "hydra_lora", **dropout},
                    "multitask": {"batch_size": 10}},
        "reweight": {**base, "algorithm": "reweight", "adapter": {"type": "lora", **dropout},
                     "data": {**base["data"], "val_task": tasks[1]}, "reweight": {"batch_size": 10}},
    }  # fmt: skip


def _run_in_fresh_process(recipes: dict[str, dict], out: Path, order: list[str]) -> None:
    script = (
        "import json, sys\n"
        "from metalora.train import run\n"
        "recipes = json.loads(open(sys.argv[1]).read())\n"
        "for name in sys.argv[3:]:\n"
        "    run({**recipes[name], 'name': name, 'output_dir': sys.argv[2]})\n"
    )
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps(recipes))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random"}
    subprocess.run([sys.executable, "-c", script, str(spec), str(out), *order], check=True, env=env)


def _adapter_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("adapter.safetensors"))}


def _metrics(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            records.append({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK})
    return records


@pytest.mark.slow
def test_two_fresh_processes_give_identical_runs(tmp_path):
    recipes = _recipes(tmp_path)
    names = list(recipes)
    _run_in_fresh_process(recipes, tmp_path / "first", names)
    _run_in_fresh_process(recipes, tmp_path / "second", names[::-1])
    for name in names:
        first, second = tmp_path / "first" / name, tmp_path / "second" / name
        adapters = _adapter_files(first)
        assert adapters, f"{name}: no adapter written"
        assert adapters == _adapter_files(second), f"{name}: the adapters differ between processes"
        metrics = _metrics(first)
        assert len(metrics) >= 3 and metrics == _metrics(second), f"{name}: metrics differ"


def test_add_adapter_seed_fixes_the_init_and_leaves_the_global_rng_alone(tmp_path):
    """Oracle: the same seed gives equal initial tensors on two base copies; another seed differs; the
    global generator's next draw is what it would have been without the call."""
    import torch

    _tiny_base(tmp_path / "base")

    def init(seed: int | None) -> dict[str, torch.Tensor]:
        model = ml.add_adapter(ml.load_base(tmp_path / "base")[0], ml.MTLLoRAConfig(r=4, num_tasks=2), seed)
        return {k: v.detach().clone() for k, v in ml.adapter_parameters(model).items()}

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = init(5)
    assert torch.equal(torch.rand(3), expected_next)
    b, c = init(5), init(6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
