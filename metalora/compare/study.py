"""Training and scoring every recipe × seed of a comparison, resumably, one or two runs at a time.

Each (recipe, seed) is one run directory ``DIR/runs/<recipe>-s<seed>`` trained by ``metalora.train.run``
with the seed applied to every random choice of training (``train``, ``meta``, ``multitask`` and
``reweight`` and ``select`` seeds, and the few-shot draw ``data.pool_seed``) while ``data.seed`` (the split) stays as the
recipe has it, so every run is scored on the same held-out items. The scores, trainable parameters and
counters go to ``DIR/results/<recipe>-s<seed>.json``; a result already there is reused and a run
interrupted midway resumes from its checkpoint, so ``metalora compare`` can be stopped and started again.

``--lr-grid``: before the seeds, each recipe is trained once per rate (seed of the first run) and
scored on the *dev* split; the best macro-average primary metric picks the rate (``DIR/tune/``).

A recipe may carry its own overrides after ``@``: ``configs/meta_lora.yaml@meta.inner_steps=2`` is the recipe
with that key changed, a row of its own named ``meta_lora@meta.inner_steps=2`` (several: ``a.yaml@k=v@k2=v2``),
so a sweep (the MeTA-LoRA paper's k and |S|/|Q| tables) is one ``metalora compare`` with a recipe per value.

``--base``: the untrained base model is scored once on the same items (``DIR/results/base.json``, recipe
``base``, no trainable parameters), so the tables answer "does it beat the model I started from?" too.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from metalora import atomic
from metalora.data import load_task
from metalora.eval.targets import EvalSettings, eval_tasks_for, evaluate_adapted
from metalora.rundir import RunDir
from metalora.train.config import RunConfig
from metalora.train.runner import run as train_run

SEED_KEYS = ("train.seed", "meta.seed", "multitask.seed", "data.pool_seed")
COST_KEYS = ("optimizer_steps", "samples", "tokens", "wall_time_s")
"""The training costs a result records (summed over a LoRA-ST run's tasks)."""
BASE = "base"
"""The recipe name of the untrained base model (``--base``)."""


@dataclass
class Study:
    """What to compare and how (the ``metalora compare`` arguments)."""

    recipes: list[str]
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)
    tasks: str | None = None
    """Comma-separated tasks to score (default: each recipe's own ``data.tasks``)."""
    split: str = "test"
    shots: int | None = None
    limit: int | None = None
    jobs: int = 1
    lr_grid: list[float] | None = None
    reference: str | None = None
    base: bool = False
    """Also score the recipes' (common) base model, untrained, as the recipe ``base``."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        names = [recipe_name(r) for r in self.recipes]
        if len(set(names)) != len(names):
            raise ValueError(f"two recipes share a name: {names}; give each recipe file its own name")
        if self.base and BASE in names:
            raise ValueError(
                f"a recipe is named {BASE!r}, the name --base gives the untrained model; rename it"
            )
        if self.reference is not None and self.reference not in names + ([BASE] if self.base else []):
            raise ValueError(f"--reference {self.reference!r} is not one of the recipes {names}")
        if self.jobs < 1:
            raise ValueError(f"--jobs {self.jobs}: expected 1 or more")


VARIANT = "@"
"""Separates a recipe file from the overrides of its variant (``a.yaml@meta.inner_steps=2``)."""


def recipe_parts(recipe: str) -> tuple[str, list[str]]:
    """(the recipe file, the variant's overrides) of a recipe argument."""
    path, *variant = recipe.split(VARIANT)
    bad = [v for v in variant if "=" not in v]
    if bad:
        raise ValueError(f"recipe {recipe!r}: after {VARIANT!r} expected key=value overrides, got {bad}")
    return path, variant


def recipe_name(recipe: str) -> str:
    """The row name: the file's stem, with its variant's overrides (``meta_lora@meta.inner_steps=2``)."""
    path, variant = recipe_parts(recipe)
    return VARIANT.join([Path(path).stem, *variant])


def is_recipe(item: str) -> bool:
    """A command-line item that names a recipe (a YAML file, maybe with a variant), not an override."""
    return "=" not in item or recipe_parts(item)[0].endswith((".yaml", ".yml"))


def seed_overrides(config: RunConfig, seed: int) -> list[str]:
    keys = [*SEED_KEYS, *(["reweight.seed"] if config.algorithm == "reweight" else [])]
    keys += ["select.seed"] if config.select is not None else []
    return [f"{key}={seed}" for key in keys]


@dataclass
class Job:
    """One training run and its scoring."""

    recipe: str
    """The recipe file (a variant's overrides are in ``overrides``)."""
    seed: int
    overrides: list[str]
    run_dir: Path
    result: Path
    tasks: str | None
    settings: EvalSettings
    base: bool = False
    """Score the recipe's base model untrained (no run directory, no training)."""
    name: str = ""
    """The row the result belongs to (``recipe_name``)."""


def make_job(study: Study, recipe: str, seed: int, extra: list[str], where: str, split: str) -> Job:
    name = f"{recipe_name(recipe)}-s{seed}" + (
        "" if where == "runs" else "-" + "-".join(extra).replace("=", "")
    )
    path, variant = recipe_parts(recipe)
    base = RunConfig.from_yaml(path, [*study.overrides, *variant])
    overrides = [*study.overrides, *variant, *extra, *seed_overrides(base, seed)]
    overrides += [f"output_dir={study.out / where}", f"name={name}"]
    settings = EvalSettings(split=split, shots=study.shots, limit=study.limit, progress=False, per_item=True)
    result = study.out / ("results" if where == "runs" else where) / f"{name}.json"
    run_dir = study.out / where / name
    return Job(path, seed, overrides, run_dir, result, study.tasks, settings, name=recipe_name(recipe))


def base_job(study: Study) -> Job:
    """The untrained base model of the recipes, scored like every run (``--base``)."""
    configs = [
        RunConfig.from_yaml(path, [*study.overrides, *v]) for path, v in map(recipe_parts, study.recipes)
    ]
    models = {(c.model, c.data.seed, json.dumps(c.data.tasks, sort_keys=True)) for c in configs}
    if len(models) != 1:
        raise ValueError(
            "--base needs one base model and one set of test items: the recipes differ in model, "
            f"data.seed or data.tasks ({sorted(m[0] for m in models)})"
        )
    job = make_job(study, study.recipes[0], 0, [], "runs", study.split)
    return replace(job, result=study.out / "results" / f"{BASE}.json", base=True, name=BASE)


def _stored(job: Job) -> dict[str, Any] | None:
    if not job.result.is_file():
        return None
    stored = json.loads(job.result.read_text())
    if stored["overrides"] != job.overrides:
        raise ValueError(
            f"{job.result} was made with other settings ({stored['overrides']}); this study asks for "
            f"{job.overrides}: give the study another --out, or remove that file to redo the run"
        )
    return stored


def score_base(job: Job) -> dict[str, Any]:
    """The base model's scores on the study's items, as a result record with zero training cost."""
    config = RunConfig.from_yaml(job.recipe, job.overrides)
    if job.tasks is None:
        tasks = [load_task(spec, seed=config.data.seed) for spec in config.data.tasks]
    else:
        tasks = eval_tasks_for(config.model, job.tasks, config.data.seed)[0]
    scores, _ = evaluate_adapted(config.model, tasks, job.settings)
    result = {
        "recipe": BASE,
        "seed": 0,
        "overrides": job.overrides,
        "lr": 0.0,
        "split": job.settings.split,
        "scores": scores,
        "trainable_params": 0,
        "counters": dict.fromkeys(COST_KEYS, 0.0),
        "losses": [],
    }
    atomic.write_json(job.result, result)
    return result


def run_job(job: Job) -> dict[str, Any]:
    """Train (resuming) and score one run; its result JSON is written once, at the end."""
    stored = _stored(job)
    if stored is not None:
        return stored
    if job.base:
        return score_base(job)
    config = RunConfig.from_yaml(job.recipe, job.overrides)
    run_dir = RunDir(train_run(config))
    tasks, _ = eval_tasks_for(run_dir.root, job.tasks, config.data.seed)
    scores, _ = evaluate_adapted(run_dir.root, tasks, job.settings)
    result = {
        "recipe": job.name,
        "seed": job.seed,
        "overrides": job.overrides,
        "lr": config.train.lr,
        "split": job.settings.split,
        "scores": scores,
        "trainable_params": trainable_parameters(run_dir),
        "counters": summed_counters(run_dir),
        "losses": loss_curve(run_dir),
    }
    atomic.write_json(job.result, result)
    return result


def _run_job_one_thread(job: Job) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_job(job)


def run_jobs(jobs: list[Job], parallel: int) -> list[dict[str, Any]]:
    """Every job, ``parallel`` at a time in worker processes of one thread each (1: in this process)."""
    if parallel == 1 or len(jobs) == 1:
        return [run_job(job) for job in jobs]
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before they import torch
    spawn = multiprocessing.get_context("spawn")  # no forked torch state in the workers
    with ProcessPoolExecutor(max_workers=parallel, mp_context=spawn) as pool:
        return list(pool.map(_run_job_one_thread, jobs))


def run_study(study: Study) -> list[dict[str, Any]]:
    """Tune the rates on dev (``lr_grid``), then train and score every recipe × seed on ``split``."""
    rates = tune_rates(study) if study.lr_grid else {}
    jobs = [
        make_job(
            study, recipe, seed, [f"train.lr={rates[recipe]}"] if recipe in rates else [], "runs", study.split
        )
        for recipe in study.recipes
        for seed in study.seeds
    ]
    return run_jobs(([base_job(study)] if study.base else []) + jobs, study.jobs)


def tune_rates(study: Study) -> dict[str, float]:
    """The rate of ``lr_grid`` with the best dev score per recipe (seed of the first run); in tune.json."""
    grid = study.lr_grid or []
    jobs = [
        make_job(study, r, study.seeds[0], [f"train.lr={lr}"], "tune", "dev")
        for r in study.recipes
        for lr in grid
    ]
    results = run_jobs(jobs, study.jobs)
    chosen: dict[str, float] = {}
    for recipe in study.recipes:
        mine = [r for r in results if r["recipe"] == recipe_name(recipe)]
        best = max(mine, key=lambda r: macro_primary(r["scores"]))
        chosen[recipe] = best["lr"]
    record = {recipe_name(k): {"lr": v, "grid": grid, "split": "dev"} for k, v in chosen.items()}
    atomic.write_json(
        study.out / "tune.json", {"chosen": record, "runs": [_without_items(r) for r in results]}
    )
    return chosen


def macro_primary(scores: dict[str, dict[str, Any]]) -> float:
    """The mean over tasks of each task's primary metric."""
    return sum(s[s["primary"]] for s in scores.values()) / len(scores)


def trainable_parameters(run_dir: RunDir) -> int:
    """Adapter parameters trained in the run (LoRA-ST: summed over the tasks' adapters)."""
    files = [p for p in run_dir.root.rglob("adapter.safetensors") if "checkpoints" not in p.parts]
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as fh:
            total += sum(int(torch.Size(fh.get_slice(k).get_shape()).numel()) for k in fh.keys())
    return total


def summed_counters(run_dir: RunDir) -> dict[str, float]:
    """Optimizer steps, samples, tokens and wall time (LoRA-ST: summed over the tasks' runs)."""
    paths = (
        [run_dir.counters]
        if run_dir.counters.is_file()
        else sorted(run_dir.tasks_root.glob("*/counters.json"))
    )
    totals = dict.fromkeys(COST_KEYS, 0.0)
    for path in paths:
        data = json.loads(path.read_text())
        for key in COST_KEYS:
            totals[key] += data.get(key, 0)
    return totals


def loss_curve(run_dir: RunDir) -> list[list[float]]:
    """[step, loss] of the run's logged steps (LoRA-ST: the first task's)."""
    paths = (
        [run_dir.metrics]
        if run_dir.metrics.is_file()
        else sorted(run_dir.tasks_root.glob("*/metrics.jsonl"))[:1]
    )
    curve = []
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "event" not in record and isinstance(record.get("loss"), (int, float)):
                curve.append([record["step"], record["loss"]])
    return curve


def _without_items(result: dict[str, Any]) -> dict[str, Any]:
    scores = {t: {k: v for k, v in s.items() if k != "items"} for t, s in result["scores"].items()}
    return {**result, "scores": scores}


def study_record(study: Study) -> dict[str, Any]:
    record = asdict(study)
    record["out"] = str(study.out)
    return record
