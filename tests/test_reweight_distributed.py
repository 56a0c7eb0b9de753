"""Two CPU processes (gloo, torchrun) train exactly as one: validation statistics gathered from both
ranks, weights normalised over the global batch, the per-rank weighted gradients summed.

The file is also the worker: ``torchrun --nproc_per_node 2 tests/test_reweight_distributed.py OUT``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.testing import randomize_adapter, tiny_model
from metalora.train import EngineConfig
from metalora.train.reweight import ReweightConfig, train_reweight

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "low_rank_fused": {},
    "dense_two_backward_mean": {
        "stats": {"similarity": "dense"},
        "scheme": "two_backward",
        "direction": {"aggregation": "mean"},
    },
    "low_rank_directed": {"direction": {"balance": "answer", "shared": "remove", "score": "cosine"}},
    "exact_directed": {
        "stats": {"similarity": "exact"},
        "direction": {"balance": "answer", "shared": "remove"},
    },
    "low_rank_layer_cosine": {"direction": {"score": "layer_cosine", "shared": "remove"}},
    "exact_layer_cosine": {"stats": {"similarity": "exact"}, "direction": {"score": "layer_cosine"}},
}


def train(run_dir: Path, overrides: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from test_train_utils import PAD, make_features  # tests/ is on sys.path in pytest and the worker alike

    model = ml.add_adapter(
        tiny_model("gpt2", dtype=torch.float64), ml.LoRAConfig(r=4, target_modules=["c_attn", "c_fc"])
    )
    randomize_adapter(model, scale=0.3)
    train_features = make_features("tr", 0, 18, length=12, seed=5, vary=True)
    val_features = make_features("va", 0, 6, length=10, seed=6, vary=True)
    config = ReweightConfig.from_dict({"batch_size": 6, "val_batch_size": 3, **overrides})
    engine = EngineConfig(max_steps=3, lr=1e-2, device="cpu", progress=False)
    train_reweight(model, train_features, val_features, config, engine, run_dir, PAD)
    weights = (
        [json.loads(line) for line in (run_dir / "weights.jsonl").read_text().splitlines()]
        if (run_dir / "weights.jsonl").exists()
        else []
    )
    return {n: p.detach().clone() for n, p in adapter_parameters(model).items()}, weights


def test_two_processes_equal_one(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(Path(__file__)),
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, overrides in CONFIGS.items():
        single, single_w = train(tmp_path / "single" / name, overrides)
        multi = torch.load(tmp_path / "ddp" / name / "final.pt", weights_only=True)
        multi_w = [
            json.loads(line) for line in (tmp_path / "ddp" / name / "weights.jsonl").read_text().splitlines()
        ]
        assert [r["sample_ids"] for r in multi_w] == [r["sample_ids"] for r in single_w]
        for a, b in zip(single_w, multi_w, strict=True):
            assert a["fallback"] == b["fallback"]
            torch.testing.assert_close(
                torch.tensor(b["weights"]), torch.tensor(a["weights"]), rtol=1e-6, atol=1e-8
            )
        for key, value in single.items():
            torch.testing.assert_close(multi[key], value, rtol=1e-9, atol=1e-11, msg=f"{name}: {key}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for name, overrides in CONFIGS.items():
        state, _ = train(out / name, overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(state, out / name / "final.pt")
