"""``run(config, overrides)``: one whole training run from a recipe, into ``runs/NAME/``.

    from metalora.train import run
    run_dir = run("configs/meta_lora.yaml", overrides=["model=smollm2-135m", "meta.inner_steps=1"])

The recipe is a ``RunConfig`` (``metalora.train.config``: a YAML file, a dict or the dataclass itself; every
key optional except ``data.tasks``); overrides are ``dotted.key=value`` strings whose value is parsed as YAML
(``train.lr=1e-4``, ``data.tasks=[arc_easy,boolq]``, ``adapter.target_modules=null``).

The run directory (``metalora.rundir``) gets the resolved recipe, the data summary, the metrics, the
counters, checkpoints and the adapter (LoRA-ST: one run directory per task). Re-running the same recipe
into an existing directory resumes it. Each algorithm is one entry of ``ALGORITHM_RUNNERS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metalora import atomic
from metalora.adapters.api import ADAPTER_TYPES, add_adapter, config_from_dict
from metalora.data import build_pools, load_task, load_tasks, task_id_map, tokenize_examples
from metalora.models import load_base
from metalora.rundir import RunDir
from metalora.train import distributed as dist_utils
from metalora.train.batching import Feature
from metalora.train.config import ALGORITHMS, RunConfig, RunConfigError
from metalora.train.meta import build_sampler, train_meta
from metalora.train.multitask import few_shot_epochs, steps_for_epochs, train_multitask, train_single_task
from metalora.train.reweight import train_reweight
from metalora.train.reweight_data import draw_validation_set, held_out_keys
from metalora.train.selection import select_pool

__all__ = ["ALGORITHMS", "RunConfigError", "resolve_config", "run"]


def resolve_config(config: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe with defaults and ``overrides`` applied and every section validated, as plain data."""
    return RunConfig.load(config, overrides).to_dict()


@dataclass
class RunData:
    """What every algorithm trains on: tokenized features per task, and the task ids."""

    features: dict[str, list[Feature]]
    task_to_id: dict[str, int]
    pad_token_id: int
    validation: list[Feature] = field(default_factory=list)
    """Reweighting's validation set (empty for the other algorithms)."""

    @property
    def mixed(self) -> list[Feature]:
        """All tasks' features in one list (LoRA-MT and reweighting draw mixed batches from it)."""
        return [f for fs in self.features.values() for f in fs]


def run(config: str | Path | Mapping[str, Any] | RunConfig, overrides: Sequence[str] = ()) -> Path:
    """Train as the recipe says; returns the run directory ``output_dir/name``."""
    cfg = RunConfig.load(config, overrides)
    tasks = load_tasks(cfg.data.tasks, seed=cfg.data.seed)
    k = cfg.data.examples_per_task
    pool_seed = cfg.data.seed if cfg.data.pool_seed is None else cfg.data.pool_seed
    examples = build_pools(tasks, k, seed=pool_seed) if k else {t.name: t.train for t in tasks}
    selection = None
    if cfg.select is not None:
        n_pool = sum(len(e) for e in examples.values())
        target = _validation_examples(cfg, n_pool, cfg.select.val_ratio, cfg.select.seed, "select.val_ratio")
        examples, selection = select_pool(cfg.select, examples, target)
    model, tokenizer = load_model(cfg)
    task_to_id = _with_extra_tasks(task_id_map(tasks), examples, cfg)
    features, stats = {}, {}
    for name, exs in examples.items():
        features[name], st = _tokenize(exs, tokenizer, task_to_id, cfg)
        if st.total and st.all_masked == st.total:
            raise RunConfigError(
                f"task {name!r}: every one of its {st.total} samples has no response token left after "
                f"truncation to data.max_length={cfg.data.max_length} (data.truncate={cfg.data.truncate!r}); "
                "nothing would be learned: raise max_length or truncate the prompt (left_prompt)"
            )
        stats[name] = {key: v for key, v in st.as_dict().items() if not key.endswith("_ids")}
    data = RunData(features, task_to_id, tokenizer.pad_token_id)
    if cfg.algorithm == "reweight":
        data.validation = _validation_features(cfg, tokenizer, task_to_id, len(data.mixed))
    _apply_epochs(cfg, data)
    run_dir = RunDir(cfg.run_dir)
    data_info = {"task_to_id": task_to_id, "train_examples": {n: len(e) for n, e in examples.items()}}
    if data.validation:  # which examples formed reweighting's validation set, beside the training pools
        data_info["validation_ids"] = [f["sample_id"] for f in data.validation]
    if selection is not None:
        data_info["selection"] = selection
    with run_dir.lock() if dist_utils.rank() == 0 else contextlib.nullcontext():
        _write_run_files(run_dir, cfg, data_info | {"tokenize": stats})
        ALGORITHM_RUNNERS[cfg.algorithm](cfg, model, tokenizer, data, run_dir)
    return run_dir.root


def _apply_epochs(cfg: RunConfig, data: RunData) -> None:
    """The few-shot protocol sets the epochs; LoRA-MT's epochs set ``train.max_steps``."""
    if cfg.algorithm != "meta" and cfg.multitask.protocol == "few_shot":
        if not cfg.data.examples_per_task:
            raise RunConfigError("multitask.protocol=few_shot needs data.examples_per_task (50 or 100)")
        cfg.multitask.epochs = few_shot_epochs(cfg.data.examples_per_task)
    if cfg.algorithm == "lora_mt" and cfg.multitask.epochs is not None:
        n = sum(len(f) for f in data.features.values())
        cfg.train.max_steps = steps_for_epochs(n, cfg.multitask.batch_size, cfg.multitask.epochs)


# --- the algorithms -----------------------------------------------------------------------------------


def _run_meta(cfg: RunConfig, model: Any, tokenizer: Any, data: RunData, run_dir: RunDir) -> None:
    sampler = build_sampler(data.features, cfg.meta, data.task_to_id)
    train_meta(model, sampler, cfg.meta, cfg.train, run_dir.root, data.pad_token_id)


def _run_lora_mt(cfg: RunConfig, model: Any, tokenizer: Any, data: RunData, run_dir: RunDir) -> None:
    names = list(data.task_to_id)
    train_multitask(
        model, data.mixed, cfg.multitask, cfg.train, run_dir.root, data.pad_token_id, task_names=names
    )


def _run_lora_st(cfg: RunConfig, model: Any, tokenizer: Any, data: RunData, run_dir: RunDir) -> None:
    first = {"model": model}

    def make_model(task: str):  # the first task reuses the model already loaded
        return first.pop("model") if first else load_model(cfg)[0]

    train_single_task(make_model, data.features, cfg.multitask, cfg.train, run_dir.root, data.pad_token_id)


def _run_reweight(cfg: RunConfig, model: Any, tokenizer: Any, data: RunData, run_dir: RunDir) -> None:
    train_reweight(
        model, data.mixed, data.validation, cfg.reweight, cfg.train, run_dir.root, data.pad_token_id
    )


AlgorithmRunner = Callable[[RunConfig, Any, Any, RunData, RunDir], None]
ALGORITHM_RUNNERS: dict[str, AlgorithmRunner] = {
    "meta": _run_meta,
    "lora_mt": _run_lora_mt,
    "lora_st": _run_lora_st,
    "reweight": _run_reweight,
}
assert set(ALGORITHM_RUNNERS) == set(ALGORITHMS)


# --- helpers ------------------------------------------------------------------------------------------


def _validation_examples(cfg: RunConfig, n_train: int, ratio: int, seed: int, ratio_key: str) -> list:
    """The validation set (``reweight_data``): M = N // ``ratio`` examples (N = ``n_train``, the training
    pool; ``data.val_examples`` sets M) of ``data.val_split`` of ``data.val_task``, drawn with ``seed``, none
    of them a test item. Reweighting's validation set and ``select:``'s target set."""
    data = cfg.data
    if data.val_split == "test":
        raise RunConfigError("data.val_split='test': the validation set must be disjoint from the test items")
    val_task = load_task(data.val_task, seed=data.seed)
    candidates = val_task.split(data.val_split)
    if not candidates:
        raise RunConfigError(f"data.val_task {val_task.name!r} has no examples in split {data.val_split!r}")
    exclude = held_out_keys(val_task.test)
    return draw_validation_set(
        candidates, n_train, ratio, seed, exclude=exclude, size=data.val_examples, ratio_key=ratio_key
    )


def _validation_features(
    cfg: RunConfig, tokenizer: Any, task_to_id: dict[str, int], n_train: int
) -> list[Feature]:
    """The reweighting validation set (``_validation_examples`` with ``reweight.val_ratio`` and
    ``reweight.seed``), tokenized like training."""
    r = cfg.reweight
    examples = _validation_examples(cfg, n_train, r.val_ratio, r.seed, "reweight.val_ratio")
    name = examples[0].task
    ids = dict(task_to_id)
    if name not in ids:
        if _task_routed(cfg):
            raise RunConfigError(
                f"data.val_task {name!r} is not one of data.tasks {sorted(task_to_id)}: a task-routed "
                "adapter can only score validation samples of a task it routes"
            )
        ids[name] = 0  # an adapter that does not route by task ignores the id
    return _tokenize(examples, tokenizer, ids, cfg)[0]


def _task_routed(cfg: RunConfig) -> bool:
    return ADAPTER_TYPES[cfg.adapter.get("type", "lora")][0].task_routed


def _with_extra_tasks(
    task_to_id: dict[str, int], examples: dict[str, list], cfg: RunConfig
) -> dict[str, int]:
    """The task ids, with one more for each task that only ``select.method: mix`` brought in (the
    validation task's examples); a task-routed adapter has no head for it and is refused."""
    extra = [name for name in examples if name not in task_to_id]
    if extra and _task_routed(cfg):
        raise RunConfigError(
            f"select.method=mix adds examples of {extra}, which are not in data.tasks {sorted(task_to_id)}: a "
            "task-routed adapter has no head for them; add the validation task to data.tasks"
        )
    return task_to_id | {name: len(task_to_id) + i for i, name in enumerate(extra)}


def _tokenize(examples: list, tokenizer: Any, task_to_id: dict[str, int], cfg: RunConfig):
    """Tokenize with the recipe's ``data`` settings (training pools and the validation set alike)."""
    d = cfg.data
    return tokenize_examples(
        examples, tokenizer, task_to_id, max_length=d.max_length, truncate=d.truncate, template=d.template
    )


def load_model(cfg: RunConfig):
    """The base model with the recipe's adapter, its random init drawn from ``train.seed``."""
    adapter = dict(cfg.adapter)
    kind = adapter.pop("type", "lora")
    model, tokenizer = load_base(
        cfg.model,
        dtype=cfg.dtype,
        quantization=cfg.quantization,
        trust_remote_code=cfg.trust_remote_code,
        **cfg.model_kwargs,
    )
    # the adapter's random init comes from the run's seed, not from torch's per-process random seed
    return add_adapter(model, config_from_dict(kind, adapter), seed=cfg.train.seed), tokenizer


def _write_run_files(run_dir: RunDir, cfg: RunConfig, data_info: dict[str, Any]) -> None:
    if dist_utils.rank() != 0:
        return
    atomic.write_text(run_dir.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic.write_json(run_dir.data, data_info)
