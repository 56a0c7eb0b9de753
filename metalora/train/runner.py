"""``run(config, overrides)``: one whole training run from a recipe, into ``runs/NAME/``.

    from metalora.train import run
    run_dir = run("configs/meta_lora.yaml", overrides=["model=smollm2-135m", "meta.inner_steps=1"])

A recipe is a YAML file or a dict with the sections below (every key optional except ``data.tasks``);
overrides are ``dotted.key=value`` strings whose value is parsed as YAML (``train.lr=1e-4``,
``data.tasks=[arc_easy,boolq]``, ``adapter.target_modules=null``).

    name: meta_lora              # run directory name under output_dir
    output_dir: runs
    algorithm: meta              # meta | lora_mt | lora_st
    model: smollm2-135m          # load_base name or local path
    dtype: float32               # parameter dtype of the base model
    adapter: {type: lora, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    data: {tasks: [...], examples_per_task: 50, max_length: 256, template: plain, truncate: left_prompt, seed: 0}
    meta: MetaConfig fields      # algorithm: meta
    multitask: MultitaskConfig fields + protocol: few_shot | null   # lora_mt / lora_st
    train: EngineConfig fields

The run directory gets ``config.yaml`` (the resolved recipe), ``data.json`` (task sizes, tokenization
stats, task ids), ``metrics.jsonl``, ``counters.json``, ``checkpoints/`` and ``adapter/`` (LoRA-ST:
``tasks/<task>/…`` per task). Re-running the same recipe into an existing directory resumes it.
Task-routed adapters (MTL-LoRA, MoELoRA) get ``task_names`` = the data tasks unless given.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from metalora import atomic
from metalora.train.engine import EngineConfig
from metalora.train.meta import MetaConfig, build_sampler, train_meta
from metalora.train.multitask import (
    MultitaskConfig,
    few_shot_epochs,
    steps_for_epochs,
    train_multitask,
    train_single_task,
)

ALGORITHMS = ("meta", "lora_mt", "lora_st", "reweight")
DEFAULTS: dict[str, Any] = {
    "name": None,
    "output_dir": "runs",
    "algorithm": "meta",
    "model": "smollm2-135m",
    "dtype": "float32",
    "adapter": {
        "type": "lora",
        "r": 16,
        "alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "data": {
        "tasks": None,
        "examples_per_task": 50,
        "max_length": 256,
        "template": "plain",
        "truncate": "left_prompt",
        "seed": 0,
        "val_task": None,  # reweight: the trusted validation set (a task name, spec dict or file)
        "val_split": "dev",
        "val_examples": None,
    },
    "meta": {},
    "reweight": {},
    "multitask": {"protocol": None},
    "train": {},
}


class RunConfigError(ValueError):
    """A recipe or override that cannot be resolved."""


# --- recipe -----------------------------------------------------------------------------------------


def resolve_config(config: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe merged over ``DEFAULTS`` with ``overrides`` applied and every section validated."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise RunConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, Mapping):
            raise RunConfigError(f"{path}: the top level must be a mapping of sections")
        default_name = path.stem
    else:
        loaded, default_name = config, None
    resolved = _merge(copy.deepcopy(DEFAULTS), dict(loaded), "")
    for item in overrides:
        _apply_override(resolved, item)
    resolved["name"] = resolved["name"] or default_name or resolved["algorithm"]
    if resolved["algorithm"] not in ALGORITHMS:
        raise RunConfigError(f"algorithm={resolved['algorithm']!r}: expected one of {ALGORITHMS}")
    if not resolved["data"]["tasks"]:
        raise RunConfigError(
            "data.tasks is empty: give the tasks to train on, e.g. data.tasks=[arc_easy,boolq]"
        )
    engine, meta, mt, protocol = _sections(resolved)  # validate now, before any model is loaded
    resolved["train"] = {**asdict(engine), "betas": list(engine.betas)}
    resolved["meta"] = asdict(meta)
    resolved["multitask"] = {**asdict(mt), "protocol": protocol}
    if resolved["algorithm"] == "reweight":
        resolved["reweight"] = asdict(_reweight_section(resolved))
    return resolved


def _reweight_section(config: dict[str, Any]):
    from metalora.train.reweight import ReweightConfig

    if not config["data"].get("val_task"):
        raise RunConfigError("algorithm=reweight needs data.val_task: the trusted validation task or file")
    return _build(ReweightConfig, "reweight", config["reweight"])


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key, value in update.items():
        if key not in base:
            raise RunConfigError(f"unknown config key {where}{key!r}; known: {sorted(base)}")
        open_section = isinstance(base[key], dict) and key in (
            "meta",
            "multitask",
            "train",
            "adapter",
            "reweight",
        )
        if isinstance(base[key], dict) and isinstance(value, Mapping) and not open_section:
            base[key] = _merge(base[key], value, f"{where}{key}.")
        elif isinstance(base[key], dict) and isinstance(value, Mapping):
            base[key] = {**base[key], **value}  # checked against the dataclass fields later
        else:
            base[key] = value
    return base


def _apply_override(config: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise RunConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
    key, _, raw = item.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.strip().split(".")
    node = config
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise RunConfigError(f"override {item!r}: {part!r} is not a config section")
        node = node[part]
    if len(parts) == 1 and parts[0] not in config:
        raise RunConfigError(f"override {item!r}: unknown key {parts[0]!r}; known: {sorted(config)}")
    node[parts[-1]] = value


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    types = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise RunConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(types)}")
    values = {k: _coerce_float(v, types[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**values)


def _coerce_float(value: Any, annotation: str, key: str) -> Any:
    # YAML 1.1 reads `1e-4` (no dot) as a string; accept it where the field is a float.
    if isinstance(value, str) and "float" in annotation:
        try:
            return float(value)
        except ValueError:
            raise RunConfigError(f"{key}={value!r}: expected a number") from None
    return value


def _sections(config: dict[str, Any]) -> tuple[EngineConfig, MetaConfig, MultitaskConfig, str | None]:
    engine = _build(EngineConfig, "train", config["train"])
    meta = _build(MetaConfig, "meta", config["meta"])
    mt = dict(config["multitask"])
    protocol = mt.pop("protocol", None)
    if protocol not in (None, "few_shot"):
        raise RunConfigError(f"multitask.protocol={protocol!r}: expected null or 'few_shot'")
    return engine, meta, _build(MultitaskConfig, "multitask", mt), protocol


# --- the run ------------------------------------------------------------------------------------------


def run(config: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Path:
    """Train as the recipe says; returns the run directory ``output_dir/name``."""
    from metalora.data import build_pools, load_tasks, task_id_map

    cfg = resolve_config(config, overrides)
    engine_cfg, meta_cfg, mt_cfg, protocol = _sections(cfg)
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    data = cfg["data"]

    tasks = load_tasks(data["tasks"], seed=data["seed"])
    task_to_id = task_id_map(tasks)
    k = data["examples_per_task"]
    examples = build_pools(tasks, k, seed=data["seed"]) if k else {t.name: t.train for t in tasks}
    model, tokenizer = _load_model(cfg, list(task_to_id))
    features, stats = {}, {}
    for name, exs in examples.items():
        features[name], st = _tokenize(exs, tokenizer, task_to_id, data)
        stats[name] = {k_: v for k_, v in st.as_dict().items() if not k_.endswith("_ids")}
    pad = tokenizer.pad_token_id

    if cfg["algorithm"] != "meta" and protocol == "few_shot":
        if not k:
            raise RunConfigError("multitask.protocol=few_shot needs data.examples_per_task (50 or 100)")
        mt_cfg.epochs = few_shot_epochs(k)
    if cfg["algorithm"] == "lora_mt" and mt_cfg.epochs is not None:
        n = sum(len(f) for f in features.values())
        engine_cfg.max_steps = steps_for_epochs(n, mt_cfg.batch_size, mt_cfg.epochs)
    data_info = {
        "task_to_id": task_to_id,
        "train_examples": {n: len(e) for n, e in examples.items()},
        "tokenize": stats,
    }
    _write_run_files(run_dir, cfg, (engine_cfg, meta_cfg, mt_cfg, protocol), data_info)

    mixed = [f for fs in features.values() for f in fs]  # all tasks' features, for reweight and LoRA-MT
    if cfg["algorithm"] == "reweight":
        from metalora.train.reweight import train_reweight

        val_features = _validation_features(cfg, tokenizer, task_to_id)
        train_reweight(model, mixed, val_features, _reweight_section(cfg), engine_cfg, run_dir, pad)
        return run_dir
    if cfg["algorithm"] == "meta":
        train_meta(model, build_sampler(features, meta_cfg, task_to_id), meta_cfg, engine_cfg, run_dir, pad)
        return run_dir
    if cfg["algorithm"] == "lora_mt":
        train_multitask(model, mixed, mt_cfg, engine_cfg, run_dir, pad, task_names=list(task_to_id))
    else:
        first = {"model": model}

        def make_model(task: str):
            return first.pop("model") if first else _load_model(cfg, list(task_to_id))[0]

        train_single_task(make_model, features, mt_cfg, engine_cfg, run_dir, pad)
    return run_dir


def _validation_features(cfg: dict[str, Any], tokenizer: Any, task_to_id: dict[str, int]) -> list:
    """The reweighting validation set: ``data.val_split`` of ``data.val_task``, tokenized like training."""
    from metalora.adapters.api import ADAPTER_TYPES
    from metalora.data import load_task

    data = cfg["data"]
    val_task = load_task(data["val_task"], seed=data["seed"])
    examples = val_task.split(data["val_split"])[: data["val_examples"] or None]
    if not examples:
        raise RunConfigError(
            f"data.val_task {val_task.name!r} has no examples in split {data['val_split']!r}"
        )
    ids = dict(task_to_id)
    if val_task.name not in ids:
        if ADAPTER_TYPES[cfg["adapter"].get("type", "lora")][0].task_routed:
            raise RunConfigError(
                f"data.val_task {val_task.name!r} is not one of data.tasks {sorted(task_to_id)}: a task-routed "
                "adapter can only score validation samples of a task it routes"
            )
        ids[val_task.name] = 0  # an adapter that does not route by task ignores the id
    return _tokenize(examples, tokenizer, ids, data)[0]


def _tokenize(examples: list, tokenizer: Any, task_to_id: dict[str, int], data: dict[str, Any]):
    """Tokenize with the recipe's ``data`` settings (training pools and the validation set alike)."""
    from metalora.data import tokenize_examples

    return tokenize_examples(
        examples,
        tokenizer,
        task_to_id,
        max_length=data["max_length"],
        truncate=data["truncate"],
        template=data["template"],
    )


def _load_model(cfg: dict[str, Any], task_names: list[str]):
    import metalora as ml
    from metalora.adapters.api import ADAPTER_TYPES, config_from_dict

    adapter = dict(cfg["adapter"])
    kind = adapter.pop("type", "lora")
    if kind not in ADAPTER_TYPES:
        raise RunConfigError(f"adapter.type={kind!r}: expected one of {sorted(ADAPTER_TYPES)}")
    if (
        ADAPTER_TYPES[kind][0].task_routed
        and adapter.get("task_names") is None
        and adapter.get("num_tasks") is None
    ):
        adapter["task_names"] = task_names
    model, tokenizer = ml.load_base(cfg["model"], dtype=cfg["dtype"])
    # the adapter's random init comes from the run's seed, not from torch's per-process random seed
    return ml.add_adapter(model, config_from_dict(kind, adapter), seed=cfg["train"]["seed"]), tokenizer


def _write_run_files(run_dir: Path, cfg: dict[str, Any], sections: tuple, data_info: dict[str, Any]) -> None:
    from metalora.train import distributed as dist_utils

    if dist_utils.rank() != 0:
        return
    engine_cfg, meta_cfg, mt_cfg, protocol = sections
    resolved = copy.deepcopy(cfg)
    resolved["train"] = {**asdict(engine_cfg), "betas": list(engine_cfg.betas)}
    resolved["meta"] = asdict(meta_cfg)
    resolved["multitask"] = {**asdict(mt_cfg), "protocol": protocol}
    atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic.write_json(run_dir / "data.json", data_info)
