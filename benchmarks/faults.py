"""Fault injection: ``kill -9`` training runs at random moments, resume them, and compare bit for bit.

    python benchmarks/faults.py                       # 4 algorithms x 1 and 2 processes, 5 kills each
    python benchmarks/faults.py --kills 1 --quick     # the CI version (tests/test_faults.py)

For every algorithm (LoRA-MT, LoRA-ST, MeTA-LoRA, reweighting) and process count (1, or 2 under
``torchrun --standalone``), on a tiny random-init Llama saved to disk:

1. an uninterrupted ``metalora train`` run is the reference;
2. each trial starts the same recipe in a fresh run directory, waits until training has begun, sleeps a
   random time drawn (seeded) from the reference's training span, and kills the whole process group with
   SIGKILL; checkpoints are written every step, so many kills land inside a checkpoint write (counted:
   a ``.tmp-step-*`` directory or a temporary file left behind);
3. the same command is run again until it completes (it resumes from the last complete checkpoint);
4. the resumed run's adapters must be byte-identical to the reference's, and its ``metrics.jsonl`` records
   equal in every field but the wall-clock ones (resume events aside).

Prints a table and writes ``results/faults.json`` (kills tried, kills inside a checkpoint write,
identical results). Each run is one thread per process (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, table  # noqa: E402

from metalora.testing import tiny_model, word_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
WALL_CLOCK = {"step_time_s", "samples_per_s", "tokens_per_s", "wall_time_s"}
ALGORITHMS = ("lora_mt", "lora_st", "meta", "reweight")


def build_base(work: Path) -> Path:
    """A tiny Llama and its word tokenizer, saved as a local HF model directory."""
    base = work / "base"
    if not (base / "config.json").is_file():
        special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        tok = word_tokenizer(["<pad>", "<s>", "</s>", "<unk>", *WORDS], **special)
        model = tiny_model(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model.save_pretrained(base)
        tok.save_pretrained(base)
    return base


def build_tasks(work: Path) -> list[dict[str, Any]]:
    specs = []
    for t in range(3):
        rows = [{"q": f"w{t} w{i % 20} w{(i * 7) % 20}", "a": f"w{20 + (i + t) % 20}"} for i in range(60)]
        path = work / f"task{t}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs.append({"name": f"task{t}", "path": str(path), "prompt_field": "q", "response_field": "a"})
    return specs


def recipe(algorithm: str, base: Path, tasks: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    adapter = {"type": "mtl_lora" if algorithm == "meta" else "lora", "r": 4, "dropout": 0.1}
    cfg: dict[str, Any] = {
        "algorithm": algorithm,
        "model": str(base),
        "adapter": adapter,
        "data": {"tasks": tasks, "examples_per_task": 20, "max_length": 16},
        "meta": {"support_size": 4, "query_size": 4, "inner_lr": 1e-2},
        "multitask": {"batch_size": 6},
        "reweight": {"batch_size": 6},
        "train": {"max_steps": steps, "lr": 1e-2, "progress": False, "checkpoint_every": 1, "seed": 3},
    }
    if algorithm == "reweight":
        cfg["data"]["val_task"] = tasks[1]
    return cfg


def command(processes: int, recipe_path: Path, run_dir: Path) -> list[str]:
    train = [
        "-m",
        "metalora.cli",
        "train",
        str(recipe_path),
        f"output_dir={run_dir.parent}",
        f"name={run_dir.name}",
    ]
    if processes == 1:
        return [sys.executable, *train]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *train,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run_to_completion(cmd: list[str], tries: int = 5) -> None:
    for _ in range(tries):
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        if proc.returncode == 0:
            return
    raise RuntimeError(f"{' '.join(cmd)} failed {tries} times:\n{proc.stderr[-3000:]}")


def started(run_dir: Path) -> bool:
    return any(p.read_text().strip() for p in run_dir.rglob("metrics.jsonl"))


def kill_during_training(cmd: list[str], run_dir: Path, delay: float) -> bool:
    """Start ``cmd``, wait for its first logged step, sleep ``delay``, SIGKILL the process group; returns
    whether the run was still going when killed."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while proc.poll() is None and not started(run_dir):
        time.sleep(0.02)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_for_group_exit(proc.pid)  # torchrun's workers die a moment after the launcher
    return alive


def _wait_for_group_exit(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def in_checkpoint_write(run_dir: Path) -> bool:
    """A kill landed inside a checkpoint write if it left a partial checkpoint or a temporary file."""
    for _ in range(10):
        try:
            tmp_files = any(p.name.endswith(".tmp") for p in run_dir.rglob(".*"))
            return any(run_dir.rglob(".tmp-step-*")) or tmp_files
        except FileNotFoundError:  # a dying process removed a directory while it was scanned
            time.sleep(0.1)
    raise RuntimeError(f"{run_dir} kept changing after its run was killed")


def outputs(run_dir: Path) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """(final adapter files, metrics records without events and wall-clock fields) of a run directory."""
    adapters = {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("adapter.safetensors"))
        if "checkpoints" not in p.parts
    }
    records = []
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "event" not in record:
                records.append({k: v for k, v in record.items() if k not in WALL_CLOCK})
    return adapters, records


def timed_reference(cmd: list[str], run_dir: Path) -> float:
    """Run the reference; returns its training span (first to last logged step) in seconds."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = last = None
    lines = 0
    while proc.poll() is None:
        # the run's and its LoRA-ST tasks' logs only: an rglob would walk checkpoint directories that the run
        # rotates away mid-scan (FileNotFoundError)
        logs = [*run_dir.glob("metrics.jsonl"), *run_dir.glob("tasks/*/metrics.jsonl")]
        now = sum(len(p.read_text().splitlines()) for p in logs)
        if now > lines:
            lines, last = now, time.perf_counter()
            first = first or last
        time.sleep(0.02)
    _, err = proc.communicate()
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"reference run failed:\n{err[-3000:]}")
    return last - first


def trial_set(algorithm: str, processes: int, kills: int, work: Path, rng: random.Random, steps: int) -> dict:
    base, tasks = build_base(work), build_tasks(work)
    recipe_path = work / f"{algorithm}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(algorithm, base, tasks, steps)))
    reference = work / "runs" / f"{algorithm}-p{processes}-ref"
    span = timed_reference(command(processes, recipe_path, reference), reference)
    expected = outputs(reference)
    row = {
        "algorithm": algorithm,
        "processes": processes,
        "kills": 0,
        "in_checkpoint_write": 0,
        "identical": 0,
    }
    for k in range(kills):
        run_dir = work / "runs" / f"{algorithm}-p{processes}-kill{k}"
        cmd = command(processes, recipe_path, run_dir)
        if kill_during_training(cmd, run_dir, rng.uniform(0.0, span)):
            row["kills"] += 1
            row["in_checkpoint_write"] += int(in_checkpoint_write(run_dir))
        run_to_completion(cmd)
        row["identical"] += int(outputs(run_dir) == expected)
    row["trials"] = kills
    row["reference_train_s"] = round(span, 2)
    return row


COLUMNS = [
    "algorithm",
    "processes",
    "trials",
    "kills",
    "in_checkpoint_write",
    "identical",
    "reference_train_s",
]


def markdown(result: dict[str, Any]) -> str:
    totals = result["totals"]
    return (
        table(result["rows"], COLUMNS)
        + f"\n| **total** | | {totals['trials']} | {totals['kills']} | {totals['in_checkpoint_write']} | "
        + f"{totals['identical']} | |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--kills", type=int, default=5, help="kill-and-resume trials per algorithm and process count"
    )
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/metalora_faults"))
    p.add_argument("--quick", action="store_true", help="CI: 2 processes only for lora_mt and meta")
    p.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    p.add_argument(
        "--markdown", action="store_true", help="print the docs table from the stored JSON; run nothing"
    )
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    rng = random.Random(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for algorithm in args.algorithms.split(","):
        for processes in map(int, args.processes.split(",")):
            if args.quick and processes > 1 and algorithm not in ("lora_mt", "meta"):
                continue
            rows.append(trial_set(algorithm, processes, args.kills, args.work_dir, rng, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, COLUMNS))
    totals = {k: sum(r[k] for r in rows) for k in ("trials", "kills", "in_checkpoint_write", "identical")}
    print(f"total: {totals}")
    config = vars(args) | {"work_dir": str(args.work_dir), "out": str(args.out)}
    result = {"config": config, "rows": rows, "totals": totals, "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
