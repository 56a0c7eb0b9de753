"""``RunConfig``: the typed run recipe (a YAML file or a dict, plus ``dotted.key=value`` overrides).

    name: meta_lora              # run directory name under output_dir (default: the YAML file's stem)
    output_dir: runs
    algorithm: meta              # meta | lora_mt | lora_st | reweight
    model: smollm2-135m          # load_base name, local path or hub name (downloaded unless HF_HUB_OFFLINE)
    dtype: float32               # parameter dtype of the base model
    quantization: null           # QLoRA: nf4 (4-bit NormalFloat) | int8 base through bitsandbytes, or null
    model_kwargs: {revision: main, attn_implementation: sdpa}   # passed to from_pretrained
    trust_remote_code: false     # a hub repository's own modelling code runs only when this is true
    adapter: {type: lora, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    data: DataConfig fields      # tasks is required
    meta: MetaConfig fields      # algorithm: meta
    multitask: MultitaskConfig fields (+ protocol: few_shot | null)   # lora_mt / lora_st
    reweight: ReweightConfig fields                                   # algorithm: reweight
    select: SelectConfig fields   # lora_mt: train on a BM25 / DSIR / classifier selection or a MIX (selection.py)
    train: EngineConfig fields

``quantization`` is a top-level key beside ``dtype`` (both say how the base's weights are stored), not part
of ``model`` (a name, as every command and the run directory read it) nor of ``model_kwargs``
(from_pretrained's own keys): ``load_base(model, dtype, quantization=...)`` builds transformers'
``BitsAndBytesConfig`` from it (``metalora.models``). An unknown value is an error naming the key; the
spelling ``model.quantization=nf4`` and a ``model:`` mapping are errors that point to the key; full
fine-tuning (``adapter.type: none``) cannot train a quantized base and is refused.

Every section is a dataclass; ``coerce_fields`` is the one validation helper: it checks each value
against the field's annotation (so an override ``train.lr=1e-4``, which YAML 1.1 reads as a string, becomes
a float, and ``train.max_steps=ten`` names the key and the expected type), then the section's own
``__post_init__`` checks ranges. ``RunConfig.from_yaml(path, overrides).to_dict()`` is what the run saves
as ``config.yaml``, and ``RunConfig.from_dict(to_dict())`` gives the same config back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from metalora.adapters.api import ADAPTER_TYPES, config_from_dict
from metalora.adapters.full_finetune import FULL_FINETUNE_TYPE
from metalora.adapters.targets import DEFAULT_ATTENTION_TARGETS
from metalora.data import TaskSpec
from metalora.data.tasks import check_task_name
from metalora.train.engine import EngineConfig
from metalora.train.meta import MetaConfig
from metalora.train.multitask import MultitaskConfig
from metalora.train.reweight import ReweightConfig
from metalora.train.selection import SelectConfig
from metalora.train.typed import FieldTypeError, coerce_fields

Algorithm = Literal["meta", "lora_mt", "lora_st", "reweight"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


class RunConfigError(ValueError):
    """A recipe or override that cannot be resolved."""


@dataclass
class DataConfig:
    """The ``data:`` section: which tasks, how many examples, how they are tokenized and split."""

    tasks: list[str | dict[str, Any]] = field(default_factory=list)
    """Built-in task names, task spec dicts or files (required, non-empty)."""
    examples_per_task: int | None = 50
    """Few-shot pool per task (None: each task's whole train split)."""
    max_length: int = 256
    """Tokens per sample after truncation."""
    template: str = "plain"
    """Prompt template: ``plain`` or ``chat`` (the tokenizer's chat template)."""
    truncate: str = "left_prompt"
    """How an over-long sample is cut (see ``metalora.data.tokenize``)."""
    seed: int = 0
    """Seed of the train/dev/test split (and of the few-shot draw unless ``pool_seed`` is set)."""
    pool_seed: int | None = None
    """Seed of the ``examples_per_task`` draw from the train split (None: ``seed``). ``metalora compare``
    varies it with the run's seed while ``seed`` keeps the test items the same."""
    val_task: str | dict[str, Any] | None = None
    """Reweighting and ``select:``: the trusted validation set (a task name, spec dict or file)."""
    val_split: str = "dev"
    """Reweighting and ``select:``: the split of ``val_task`` the validation set is drawn from (never ``test``)."""
    val_examples: int | None = None
    """Reweighting and ``select:``: the validation set's size M, overriding ``val_ratio`` (None: M = N //
    val_ratio for a training pool of N; ``metalora.train.reweight_data``)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise RunConfigError(
                "data.tasks is empty: give the tasks to train on, e.g. data.tasks=[arc_easy,boolq]"
            )
        if self.examples_per_task is not None and self.examples_per_task <= 0:
            raise RunConfigError(
                f"data.examples_per_task={self.examples_per_task!r}: expected positive or null"
            )

    @property
    def task_names(self) -> list[str]:
        return [TaskSpec.coerce(spec).name for spec in self.tasks]


MODEL_KWARGS = ("revision", "attn_implementation")
"""What ``model_kwargs`` may pass to ``load_base`` (and so to ``from_pretrained``)."""

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "meta": MetaConfig,
    "multitask": MultitaskConfig,
    "reweight": ReweightConfig,
    "select": SelectConfig,
    "train": EngineConfig,
}


@dataclass
class RunConfig:
    """One training run: top-level keys and one typed section each (see the module docstring)."""

    data: DataConfig
    name: str | None = None
    output_dir: str = "runs"
    algorithm: Algorithm = "meta"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    quantization: Literal["nf4", "int8"] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    adapter: dict[str, Any] = field(
        default_factory=lambda: {
            "type": "lora",
            "r": 16,
            "alpha": 32,
            "target_modules": list(DEFAULT_ATTENTION_TARGETS),
        }
    )
    meta: MetaConfig = field(default_factory=MetaConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    reweight: ReweightConfig | None = None
    select: SelectConfig | None = None
    train: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.model_kwargs) - set(MODEL_KWARGS))
        if unknown:
            hint = " (the model's dtype is the top-level dtype key)" if "dtype" in unknown else ""
            raise RunConfigError(f"model_kwargs: unknown key(s) {unknown}; known: {list(MODEL_KWARGS)}{hint}")
        kind = adapter_type(self.adapter)
        if self.quantization and kind == FULL_FINETUNE_TYPE:
            raise RunConfigError(
                f"quantization={self.quantization!r} with adapter.type=none: full fine-tuning cannot train a "
                "quantized base's packed weights; train an adapter over it (QLoRA) or set quantization=null"
            )
        if self.algorithm == "reweight":
            if kind == FULL_FINETUNE_TYPE:
                raise RunConfigError(
                    "algorithm=reweight scores samples by the adapter's rank-r bottleneck statistics, which "
                    "full fine-tuning (adapter.type=none) does not have: use lora_mt, lora_st or meta"
                )
            if not self.data.val_task:
                raise RunConfigError(
                    "algorithm=reweight needs data.val_task: the trusted validation task or file"
                )
            self.reweight = self.reweight or ReweightConfig()
        if self.select is not None:
            if self.algorithm != "lora_mt":
                raise RunConfigError(
                    f"select: (data selection) applies to algorithm=lora_mt, which trains on one mixed pool; "
                    f"got algorithm={self.algorithm!r}"
                )
            if not self.data.val_task:
                raise RunConfigError(
                    "select: needs data.val_task: the validation (target) task or file the pool is compared with"
                )

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"config file {path} not found")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, Mapping):
            raise RunConfigError(f"{path}: the top level must be a mapping of sections")
        return cls.from_dict(loaded, overrides, default_name=path.stem)

    @classmethod
    def from_dict(
        cls, recipe: Mapping[str, Any], overrides: Sequence[str] = (), default_name: str | None = None
    ) -> RunConfig:
        raw = copy.deepcopy(dict(recipe))
        for item in overrides:
            apply_override(raw, item)
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise RunConfigError(
                f"unknown config key(s) {unknown}; known: {sorted(f.name for f in fields(cls))}"
            )
        if isinstance(raw.get("model"), Mapping):
            raise RunConfigError(f"model: expected a model name or path, got a mapping{_model_hint('model')}")
        try:
            values: dict[str, Any] = coerce_fields(
                cls, {k: v for k, v in raw.items() if k not in SECTIONS}, ""
            )
        except FieldTypeError as exc:
            raise RunConfigError(str(exc)) from None
        for section, section_cls in SECTIONS.items():
            given = raw.get(section)
            if given is None and section in ("reweight", "select", "data"):
                continue
            values[section] = build_section(section_cls, section, given or {})
        if "data" not in values:
            raise RunConfigError(
                "data.tasks is empty: give the tasks to train on, e.g. data.tasks=[arc_easy,boolq]"
            )
        values["adapter"] = _adapter_section(raw.get("adapter"), values["data"])
        config = cls(**values)
        config.name = config.name or default_name or config.algorithm
        try:
            check_task_name(config.name)  # the run directory's name: one plain path component
        except ValueError:
            raise RunConfigError(
                f"name={config.name!r}: expected a plain name with no path separator and no leading '.' "
                "(it names the run directory under output_dir)"
            ) from None
        return config

    @classmethod
    def load(
        cls, config: str | Path | Mapping[str, Any] | RunConfig, overrides: Sequence[str] = ()
    ) -> RunConfig:
        """A config from a YAML path, a dict or a RunConfig (overrides applied to its dict form)."""
        if isinstance(config, RunConfig):
            return cls.from_dict(config.to_dict(), overrides) if overrides else config
        if isinstance(config, (str, Path)):
            return cls.from_yaml(config, overrides)
        return cls.from_dict(config, overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data (tuples become lists); ``from_dict`` of it is this config again."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "reweight" and value is not None and hasattr(value, "to_dict"):
                value = value.to_dict()
            elif hasattr(value, "__dataclass_fields__"):
                value = asdict(value)
            out[f.name] = _plain(value)
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / str(self.name)


def read_yaml(path: Path) -> Any:
    """The YAML (or JSON) in ``path``; a file that is not UTF-8 text or not YAML raises one line naming the
    file and, for a syntax error, the line and column."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RunConfigError(f"{path}: not a UTF-8 text file; expected a YAML recipe") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise RunConfigError(f"{path}: YAML syntax error at {where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RunConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None


# --- the one validation helper ------------------------------------------------------------------------


def build_section(cls: type, section: str, values: Any) -> Any:
    """``cls(**values)`` with every value checked against its annotation; errors name ``section.key``."""
    if not isinstance(values, Mapping):
        raise RunConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    try:
        if hasattr(cls, "from_dict"):  # a section with its own schema (nested keys, aliases)
            return cls.from_dict(values)
        return cls(**coerce_fields(cls, values, f"{section}."))
    except RunConfigError:
        raise
    except ValueError as exc:  # the section's own range checks (EngineConfigError, ...) name the key
        raise RunConfigError(str(exc)) from None


def apply_override(config: dict[str, Any], item: str) -> None:
    """Apply ``dotted.key=value`` (the value parsed as YAML) to the raw recipe dict."""
    if "=" not in item:
        raise RunConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RunConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    parts = key.strip().split(".")
    top = {f.name for f in fields(RunConfig)}
    if parts[0] not in top:
        raise RunConfigError(f"override {item!r}: unknown key {parts[0]!r}; known: {sorted(top)}")
    if len(parts) > 1 and parts[0] not in (*SECTIONS, "adapter", "model_kwargs"):
        raise RunConfigError(
            f"override {item!r}: {parts[0]!r} is not a config section{_model_hint(parts[0])}"
        )
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RunConfigError(f"override {item!r}: {part!r} is not a config section")
        node = child
    node[parts[-1]] = value


def _model_hint(key: str) -> str:
    return " (a quantized base is the top-level key quantization: nf4 | int8)" if key == "model" else ""


def adapter_type(adapter: Mapping[str, Any]) -> str:
    """The section's ``type`` (default ``lora``), checked against the known adapter types."""
    kind = adapter.get("type", "lora")
    if not isinstance(kind, str) or kind not in ADAPTER_TYPES:
        raise RunConfigError(f"adapter.type={kind!r}: expected one of {sorted(ADAPTER_TYPES)}")
    return kind


def _adapter_section(given: Any, data: DataConfig) -> dict[str, Any]:
    """The adapter section with its type's config validated; task-routed adapters (MTL-LoRA, MoELoRA) get
    ``task_names`` = the data tasks unless the recipe names them or a task count."""
    if given is not None and not isinstance(given, Mapping):
        raise RunConfigError(f"adapter: expected a mapping of keys, got {given!r}")
    adapter = {**RunConfig.__dataclass_fields__["adapter"].default_factory(), **(given or {})}
    kind = adapter_type(adapter)
    # the default section's LoRA fields apply to the types that have them (not to full fine-tuning)
    own = {f.name for f in fields(ADAPTER_TYPES[kind][0])} | set(given or {}) | {"type"}
    adapter = {k: v for k, v in adapter.items() if k in own}
    routed = ADAPTER_TYPES[kind][0].task_routed
    if routed and adapter.get("task_names") is None and adapter.get("num_tasks") is None:
        adapter["task_names"] = data.task_names
    config_from_dict(kind, {k: v for k, v in adapter.items() if k != "type"})  # validates the fields
    return adapter


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
