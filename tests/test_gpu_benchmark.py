"""``benchmarks/gpu.py``: its ``--tiny`` run on CPU measures every section (a)–(f) and writes the documented
JSON; the FLOPs formula and the largest-batch search are checked against hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def load_gpu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


gpu = load_gpu()
from gpubench import base, memory, training  # noqa: E402 (importable once gpu.py put benchmarks/ on sys.path)


def number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sections failed: none" in proc.stdout, proc.stdout[-3000:]
    return json.loads(out.read_text())


def test_tiny_run_has_the_documented_schema(tiny_results: dict) -> None:
    r = tiny_results
    assert r["schema"] == gpu.SCHEMA
    assert {"machine", "setup", "goals", "sections", "skipped", "elapsed_s"} <= set(r)
    assert r["setup"]["shape"] == "tiny" and r["setup"]["device"] == "cpu"
    assert r["setup"]["model_config"] == gpu.SHAPES["tiny"]
    assert list(r["sections"]) == list(gpu.SECTION_KEYS.values())
    for key, entry in r["sections"].items():
        assert entry["ok"] is True and entry["error"] is None, (key, entry.get("error"))
        assert number(entry["seconds"])
    assert r["skipped"] == []  # the default budget is far above a tiny run's time
    assert r["elapsed_s"] < 60


def test_train_steps_and_reweighting_have_time_and_memory(tiny_results: dict) -> None:
    a, c = tiny_results["sections"]["a_train_step"], tiny_results["sections"]["c_reweight_memory"]
    assert [row["adapter"] for row in a["rows"]] == base.TRAIN_VARIANTS
    assert [row["step"] for row in c["rows"]] == ["lora", "reweight"]
    paper = c["paper_setting"]  # the META paper's Table 3 setting beside ours
    assert (paper["batch"], paper["val_batch"], paper["r"]) == (4, 4, 32)
    assert paper["targets"] == [*base.QKVO, "gate_proj", "up_proj", "down_proj"]
    assert [row["step"] for row in paper["rows"]] == ["lora", "reweight"]
    for row in a["rows"] + c["rows"] + paper["rows"]:
        for field in (
            "step_s",
            "time_ratio",
            "peak_bytes",
            "peak_ratio",
            "step_growth_bytes",
            "growth_ratio",
        ):
            assert number(row[field]) and row[field] > 0, (row, field)
    assert a["rows"][0]["time_ratio"] == 1.0 and c["rows"][0]["peak_ratio"] == 1.0
    assert a["memory_kind"] == c["memory_kind"] == "cpu_resident_plus_saved_activations"
    assert c["scheme"] == "fused"


def test_inference_meta_throughput_and_max_batch_are_numbers(tiny_results: dict) -> None:
    s = tiny_results["sections"]
    b = s["b_inference"]
    assert {(row["model"], row["batch"]) for row in b["rows"]} == {
        (m, n) for m in base.INFER_VARIANTS for n in b["batch_sizes"]
    }
    assert all(number(row[k]) and row[k] > 0 for row in b["rows"] for k in ("latency_s", "prefill_s"))
    assert all(number(row["decode_step_s"]) for row in b["rows"])
    d = s["d_meta"]
    assert all(number(d[k]) and d[k] > 0 for k in ("meta_iteration_s", "raw_fwd_bwd_s", "overhead_ratio"))
    assert d["samples_per_iteration"] == 2 * (3 * 2 + 2)
    e = s["e_throughput"]
    assert [row["method"] for row in e["rows"]] == ["lora_mt", "hf_trainer_peft"]
    assert all(number(row["tokens_per_s"]) and row["tokens_per_s"] > 0 for row in e["rows"])
    assert all(row["mfu"] is None and row["hfu"] is None for row in e["rows"])  # no peak on a CPU
    assert number(e["tokens_per_s_ratio"])
    assert e["model_flops_per_token"] == 6 * (115_200 + e["adapter_params"]) + 49_152
    f = s["f_max_batch"]
    assert [row["variant"] for row in f["rows"]] == ["plain", "grad_ckpt", "nf4"]
    for row in f["rows"]:
        assert row["error"] is None, row
        largest, failing = row["largest_batch"], row["first_failing_batch"]
        assert largest >= 1 and failing is not None and 0 < failing - largest <= max(1, largest / 32), row
    plain, ckpt, nf4 = (row["largest_batch"] for row in f["rows"])
    assert ckpt > plain and nf4 >= plain  # checkpointing saves activations; NF4 shrinks the resident base


def test_markdown_prints_every_section_from_the_stored_json(tiny_results: dict) -> None:
    text = gpu.markdown(tiny_results)
    for key in gpu.SECTION_KEYS.values():
        assert f"{key} — cpu, tiny" in text
    assert "| mtl_lora |" in text and "| grad_ckpt |" in text


# --- oracles --------------------------------------------------------------------------------------------


def test_flops_formula_against_hand_computed_values() -> None:
    # tiny: per layer 4·64² (attention) + 3·64·172 (MLP) = 16,384 + 33,024; 2 layers; LM head 256·64.
    assert training.matmul_parameters(gpu.SHAPES["tiny"]) == 2 * (16_384 + 33_024) + 16_384 == 115_200
    # attention: 12 · 2 layers · 4 heads · 16 dims · 32 tokens
    assert training.attention_flops_per_token(gpu.SHAPES["tiny"], 32) == 49_152
    assert training.model_flops_per_token(gpu.SHAPES["tiny"], 32, 1000) == 6 * 116_200 + 49_152
    assert training.lora_flops_per_token(gpu.SHAPES["tiny"], 32, 1000) == 4 * 115_200 + 6_000 + 49_152
    # LLaMA2-7B: 32·(4·4096² + 3·4096·11008) + 32000·4096 (6.74B parameters less the 131M embedding)
    assert training.matmul_parameters(gpu.SHAPES["llama2-7b"]) == 6_607_077_376


def test_matmul_parameters_equal_the_linear_weights_of_the_built_model() -> None:
    setup = gpu.make_setup(gpu.parse_args(["--tiny", "--device", "cpu"]))
    model = base.build_base(setup)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linear == training.matmul_parameters(gpu.SHAPES["tiny"])


def fake_allocator(fixed: int, per_sample: int, limit: int) -> tuple[Callable[[int], bool], list[int]]:
    """``fits(batch)``: fixed + batch · per_sample bytes against ``limit``, recording every call."""
    calls: list[int] = []

    def fits(batch: int) -> bool:
        calls.append(batch)
        return fixed + batch * per_sample <= limit

    return fits, calls


@pytest.mark.parametrize("start", [1, 7, 108, 109, 500, 4000])
def test_largest_batch_finds_the_allocator_limit(start: int) -> None:
    fits, calls = fake_allocator(fixed=1000, per_sample=37, limit=5000)  # 1000 + 37·108 = 4996 ≤ 5000 < 5033
    res = memory.largest_batch(fits, start)
    assert (res.largest, res.failing, res.capped) == (108, 109, False)
    assert [b for b, _ in res.trials] == calls and len(calls) == len(set(calls))
    assert all(ok == (b <= 108) for b, ok in res.trials)
    assert len(calls) <= 2 * math.log2(4096) + 2


def test_largest_batch_doubles_then_bisects() -> None:
    fits, calls = fake_allocator(fixed=0, per_sample=1, limit=100)
    memory.largest_batch(fits, 1)
    assert calls[:8] == [1, 2, 4, 8, 16, 32, 64, 128]  # doubling until the first failure
    assert calls[8:] == [96, 112, 104, 100, 102, 101]  # then bisection of [64, 128)


def test_largest_batch_edges_and_tolerance() -> None:
    fits, calls = fake_allocator(fixed=0, per_sample=1, limit=10**9)
    res = memory.largest_batch(fits, 3, max_batch=50)
    assert (res.largest, res.failing, calls) == (50, None, [3, 6, 12, 24, 48, 50])
    nothing, _ = fake_allocator(fixed=10, per_sample=1, limit=5)
    res = memory.largest_batch(nothing, 8)
    assert (res.largest, res.failing) == (0, 1)
    fits, _ = fake_allocator(fixed=0, per_sample=1, limit=1000)
    res = memory.largest_batch(fits, 1, tolerance=0.05)
    assert res.largest <= 1000 < res.failing and res.failing - res.largest <= 0.05 * res.largest


def test_largest_batch_stops_at_the_deadline_with_an_open_bracket() -> None:
    fits, calls = fake_allocator(fixed=0, per_sample=1, limit=100)
    clock = SimpleNamespace(t=0.0)

    def timed(batch: int) -> bool:
        clock.t += 1.0  # every trial takes a second
        return fits(batch)

    res = memory.largest_batch(timed, 1, deadline=3.5, clock=lambda: clock.t)
    assert res.capped and calls == [1, 2, 4, 8]
    assert (res.largest, res.failing) == (8, None)
    # a trial the cost estimate says would end after the deadline is not begun
    fits, calls = fake_allocator(fixed=0, per_sample=1, limit=100)
    res = memory.largest_batch(fits, 10, deadline=15.0, cost=lambda b: float(b), clock=lambda: 0.0)
    assert res.capped and calls == [10] and res.largest == 10


def test_a_cuda_out_of_memory_step_is_a_batch_that_does_not_fit() -> None:
    """``StepProbe`` turns CUDA's out-of-memory error into "does not fit" and drops the gradients."""

    class OneLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
            loss = (self.w.sum() * input_ids.float().mean()).abs()
            if input_ids.shape[0] > 2:
                loss.backward()  # leave a gradient behind, as a step cut short in its backward does
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return SimpleNamespace(loss=loss)

    setup = gpu.make_setup(gpu.parse_args(["--tiny", "--device", "cpu"]))
    bench = gpu.Bench(setup, gpu.Budget(60.0))
    model = OneLinear()
    probe = memory.StepProbe(bench, model)
    assert isinstance(probe(2), int) and probe.seconds_per_sample > 0
    assert probe(3) is None and model.w.grad is None
