"""The library of LoRA adapters that ``metalora compose`` (LoRAHub) weighs.

Every entry becomes one rank-r LoRA, ``{module name: (A [r, in], B [out, r])}`` with its ``lora_alpha``
and recorded base model, read from one of:

* a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``), e.g. a
  ``metalora export --peft`` output: one entry, named after the directory;
* a LoRA-ST run directory: one entry per task (``rundir.task_adapters``), named after the task;
* a metalora LoRA adapter, or a run directory holding one: one entry, read from its safetensors;
* a mergeable task-routed metalora adapter or run (MTL-LoRA, MoELoRA): one entry per task, each the
  task's rank-r LoRA as ``export_peft(model, dir, task=...)`` writes it (the base model is loaded once).

``check_library`` then requires what LoRAHub's element-wise sums need: one rank, one ``lora_alpha``, the
same target modules with the same shapes, and one base model where the adapters record one. A mismatch
is a ``LibraryError`` naming the adapter and what differs. LoRA variants whose update is not
``(alpha / r) · B A`` (DoRA, rsLoRA, per-module rank or alpha patterns, LoRA biases, embedding targets)
are refused: a weighted sum of their tensors is not what the paper composes.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from metalora.adapters import export_peft
from metalora.adapters.api import config_from_dict
from metalora.adapters.io import WEIGHTS_FILE, base_model_name, read_adapter_record
from metalora.adapters.lora import PEFT_ADAPTER_NAME
from metalora.adapters.merge import PEFT_PREFIX
from metalora.adapters.routing import find_router
from metalora.adapters.targets import in_out_features, linear_module_names
from metalora.rundir import RunDir, adapter_dir, load_adapted, task_adapters

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PARTS = ("lora_A", "lora_B")


class LibraryError(ValueError):
    """A library adapter is missing, unreadable, unsupported, or does not fit the others."""


@dataclass(frozen=True)
class LibraryAdapter:
    """One rank-r LoRA of the library: ``Δ_m = (lora_alpha / r) · B_m A_m`` on each module m."""

    name: str
    source: str
    r: int
    lora_alpha: float
    base_model: str | None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """``{module name: (A [r, in], B [out, r])}``."""


def load_library(paths: Sequence[str | Path], base: str | None = None) -> list[LibraryAdapter]:
    """Every adapter under ``paths`` (see the module docstring), with unique names, checked together.

    ``base``: the base model the library is for. A task-routed adapter is loaded onto it (default: the
    one it records), and the adapters' recorded base names are then not compared (a base given by name
    and the same base by path differ only in name); ``check_base`` still checks every module's shape."""
    if not paths:
        raise LibraryError("the library is empty: give at least one adapter or run directory")
    adapters = [adapter for path in paths for adapter in expand(path, base)]
    adapters = _unique_names(adapters)
    check_library(adapters, same_base_name=base is None)
    return adapters


def expand(path: str | Path, base: str | None = None) -> list[LibraryAdapter]:
    """The library entries one path holds."""
    path = Path(path)
    if not path.exists():
        raise LibraryError(f"library adapter {path} not found")
    if (path / PEFT_CONFIG_FILE).is_file():
        return [read_peft_lora(path, path.resolve().name)]
    per_task = task_adapters(path)
    if per_task:
        return [entry for task, d in per_task.items() for entry in read_metalora_adapter(d, task, base)]
    try:
        directory = adapter_dir(path)
    except FileNotFoundError as exc:
        raise LibraryError(
            f"library adapter {path}: neither a PEFT LoRA directory ({PEFT_CONFIG_FILE}) nor a metalora "
            f"adapter or run directory ({exc})"
        ) from None
    run_name = path.resolve().name if directory != path else _adapter_label(directory)
    return read_metalora_adapter(directory, run_name, base)


def _adapter_label(directory: Path) -> str:
    """``runs/NAME/adapter`` is called NAME; any other adapter directory by its own name."""
    resolved = directory.resolve()
    return resolved.parent.name if resolved == RunDir(resolved.parent).adapter else resolved.name


def read_metalora_adapter(directory: Path, name: str, base: str | None) -> list[LibraryAdapter]:
    """A metalora adapter directory: a LoRA read from its tensors, a task-routed one task by task."""
    record = read_adapter_record(directory)
    config = record["config"]
    if record["adapter_type"] == "lora":
        if config.get("use_dora"):
            raise LibraryError(f"library adapter {directory}: a DoRA adapter; LoRAHub composes plain LoRAs")
        tensors = _read_tensors(directory / WEIGHTS_FILE)
        factors = _factors(directory, tensors, f".{PEFT_ADAPTER_NAME}.weight", prefix="")
        r, alpha = int(config["r"]), float(config["alpha"])
        return [_entry(name, str(directory), r, alpha, record.get("base_model"), factors)]
    if not getattr(config_from_dict(record["adapter_type"], dict(config)), "task_routed", False):
        raise LibraryError(
            f"library adapter {directory}: a {record['adapter_type']} adapter holds no LoRA to compose "
            "(LoRA adapters do, and MTL-LoRA and MoELoRA adapters one per task)"
        )
    entries = _per_task_exports(directory, name, base or record.get("base_model"))
    return [replace(entry, base_model=record.get("base_model")) for entry in entries]


def _per_task_exports(directory: Path, name: str, base: str | None) -> list[LibraryAdapter]:
    """Each task's rank-r LoRA of a task-routed adapter (MTL-LoRA, MoELoRA), through ``export_peft``;
    an entry is named after its task (``NAME:<id>`` where the adapter has no task names)."""
    model = load_adapted(directory, base)
    router = find_router(model)
    assert router is not None  # task-routed by its config
    tasks: list[str | int] = list(router.task_names or range(router.num_tasks))
    entries = []
    with tempfile.TemporaryDirectory(prefix="metalora-compose-") as tmp:
        for task in tasks:
            label = task if isinstance(task, str) else f"{name}:{task}"
            try:
                export_peft(model, Path(tmp) / str(task), task=task)
            except ValueError as exc:  # NotMergeableError: e.g. HydraLoRA's per-token router
                raise LibraryError(f"library adapter {directory}: {exc}") from None
            entry = read_peft_lora(Path(tmp) / str(task), label)
            entries.append(replace(entry, source=f"{directory}:{task}"))
    return entries


def read_peft_lora(directory: Path, name: str) -> LibraryAdapter:
    """A PEFT LoRA directory as one library entry; a non-plain LoRA is a ``LibraryError``."""
    config_path, weights_path = directory / PEFT_CONFIG_FILE, directory / PEFT_WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LibraryError(f"library adapter {config_path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise LibraryError(f"library adapter {directory}: peft_type {kind!r}, expected a LORA adapter")
    _check_plain_lora(directory, config)
    factors = _factors(directory, _read_tensors(weights_path), ".weight", prefix=PEFT_PREFIX)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return _entry(name, str(directory), r, alpha, config.get("base_model_name_or_path"), factors)


def _check_plain_lora(directory: Path, config: dict[str, Any]) -> None:
    unsupported = {
        "use_dora": "DoRA",
        "use_rslora": "rsLoRA scaling",
        "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained modules",
        "lora_bias": "LoRA biases",
    }
    found = [what for key, what in unsupported.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']!r}")
    if found:
        raise LibraryError(
            f"library adapter {directory}: uses {', '.join(found)}; LoRAHub composes plain LoRAs "
            "(h = W x + (alpha/r) B A x) only"
        )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LibraryError(f"library adapter {path.parent}: {path.name} not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LibraryError(f"library adapter {path}: not a readable safetensors file ({reason})") from None


def _factors(
    directory: Path, tensors: dict[str, torch.Tensor], suffix: str, prefix: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` from tensors named ``{prefix}{module}.lora_A{suffix}`` / ``...lora_B...``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key.removeprefix(prefix), suffix)
        if part is None or not key.startswith(prefix):
            raise LibraryError(f"library adapter {directory}: unsupported tensor {key!r} (not a LoRA A or B)")
        parts.setdefault(module, {})[part] = tensor
    factors = {}
    for module, found in parts.items():
        if set(found) != set(_PARTS):
            raise LibraryError(f"library adapter {directory}: module {module!r} has {sorted(found)} only")
        a, b = found["lora_A"], found["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LibraryError(
                f"library adapter {directory}: module {module!r} has A {tuple(a.shape)} and B "
                f"{tuple(b.shape)}, not A [r, in] and B [out, r]"
            )
        factors[module] = (a, b)
    if not factors:
        raise LibraryError(f"library adapter {directory}: holds no LoRA tensors")
    return factors


def _split_key(key: str, suffix: str) -> tuple[str, str | None]:
    for part in _PARTS:
        tail = f".{part}{suffix}"
        if key.endswith(tail):
            return key[: -len(tail)], part
    return key, None


def _entry(
    name: str,
    source: str,
    r: int,
    alpha: float,
    base_model: str | None,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> LibraryAdapter:
    ranks = sorted({a.shape[0] for a, _ in factors.values()})
    if ranks != [r]:
        raise LibraryError(f"library adapter {source}: its config says r={r}, its tensors have ranks {ranks}")
    return LibraryAdapter(name, source, r, alpha, base_model, dict(sorted(factors.items())))


def _unique_names(adapters: list[LibraryAdapter]) -> list[LibraryAdapter]:
    """Names that occur twice (the same task in two runs) are replaced by their sources."""
    counts = Counter(a.name for a in adapters)
    renamed = [a if counts[a.name] == 1 else replace(a, name=a.source) for a in adapters]
    sources = Counter(a.name for a in renamed)
    duplicated = sorted(n for n, c in sources.items() if c > 1)
    if duplicated:
        raise LibraryError(f"the library lists the same adapter more than once: {', '.join(duplicated)}")
    return renamed


def check_library(adapters: Sequence[LibraryAdapter], same_base_name: bool = True) -> None:
    """Raise ``LibraryError`` unless every adapter can be summed element-wise with the first (and, with
    ``same_base_name``, records the same base model where both record one)."""
    ref = adapters[0]
    for other in adapters[1:]:
        what = f"library adapter {other.name!r} ({other.source})"
        against = f"adapter {ref.name!r}"
        if other.r != ref.r:
            raise LibraryError(
                f"{what} has rank r={other.r}, {against} r={ref.r}: LoRAHub sums the A and B matrices "
                "element-wise, so every adapter needs the same rank (different ranks are not supported)"
            )
        if other.lora_alpha != ref.lora_alpha:
            raise LibraryError(
                f"{what} has lora_alpha={other.lora_alpha:g}, {against} {ref.lora_alpha:g}: the composed "
                "adapter has one scaling alpha/r, so every adapter needs the same lora_alpha"
            )
        _check_modules(what, against, other, ref)
        if same_base_name and other.base_model and ref.base_model and other.base_model != ref.base_model:
            raise LibraryError(
                f"{what} was made for base model {other.base_model!r}, {against} for {ref.base_model!r} "
                "(pass the base model explicitly if these name the same one)"
            )


def check_base(model: nn.Module, adapter: LibraryAdapter) -> None:
    """Raise ``LibraryError`` unless every module ``adapter`` targets is a linear layer of ``model`` with
    the adapter's (in, out) features."""
    base = base_model_name(model)
    linear = set(linear_module_names(model))
    for module, (a, b) in adapter.factors.items():
        if module not in linear:
            raise LibraryError(
                f"library adapter {adapter.name!r} targets {module!r}, which is not a linear module of the "
                f"base model {base!r} (made for {adapter.base_model!r})"
            )
        shape = in_out_features(model.get_submodule(module))
        if shape != (a.shape[1], b.shape[0]):
            raise LibraryError(
                f"library adapter {adapter.name!r}: module {module!r} is (in, out)={shape} in the base model "
                f"{base!r}, the adapter's is {(a.shape[1], b.shape[0])} (made for {adapter.base_model!r})"
            )


def _check_modules(what: str, against: str, other: LibraryAdapter, ref: LibraryAdapter) -> None:
    extra, missing = (
        sorted(set(other.factors) - set(ref.factors)),
        sorted(set(ref.factors) - set(other.factors)),
    )
    if extra or missing:
        detail = (
            [f"targets {extra[:3]}{' ...' if len(extra) > 3 else ''} that {against} does not"]
            if extra
            else []
        )
        detail += [f"lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []
        raise LibraryError(f"{what} {' and '.join(detail)}: every adapter needs the same target modules")
    for module, (a, b) in other.factors.items():
        ref_a, ref_b = ref.factors[module]
        if a.shape != ref_a.shape or b.shape != ref_b.shape:
            raise LibraryError(
                f"{what}: module {module!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; {against} has "
                f"A {tuple(ref_a.shape)}, B {tuple(ref_b.shape)}"
            )
