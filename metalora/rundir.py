"""The run directory, ``runs/NAME/``: the one module that knows its layout.

    runs/NAME/
      config.yaml          the resolved recipe (``RunConfig.to_dict()``)
      data.json            task sizes, tokenization stats, task ids
      metrics.jsonl        one JSON record per logged step (``train.logging``)
      counters.json        optimizer steps, samples, tokens, wall time, status
      checkpoints/         step checkpoints and ``latest`` (``train.checkpoint`` owns their insides)
      adapter/             the trained adapter (``adapters.io``: safetensors + JSON)
      tasks/<task>/        LoRA-ST: one such directory per task, laid out like a run
      weights.jsonl        reweighting: per-step sample weights; ``sample_weights.jsonl`` their means
      eval.json            ``metalora eval`` / the demo: held-out scores, adapted and base
      peft_adapter/        the demo's PEFT export
      report.md, plots/    ``report.write_report``
      .lock                held (``fcntl.flock``) by the one process training into the directory

Everything else asks this module for a path; no other module spells out a run file's name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from metalora.adapters.io import CONFIG_FILE, load_adapter, read_adapter_record
from metalora.errors import RunDirInUse
from metalora.models import load_base


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (or of one LoRA-ST task's directory inside it)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / "config.yaml")
    data = property(lambda self: self.root / "data.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    counters = property(lambda self: self.root / "counters.json")
    summary = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    weights = property(lambda self: self.root / "weights.jsonl")
    sample_weights = property(lambda self: self.root / "sample_weights.jsonl")
    weights_hist = property(lambda self: self.root / "weights_hist.png")
    eval = property(lambda self: self.root / "eval.json")
    peft_adapter = property(lambda self: self.root / "peft_adapter")
    report = property(lambda self: self.root / "report.md")
    plots = property(lambda self: self.root / "plots")
    tasks_root = property(lambda self: self.root / "tasks")
    lock_file = property(lambda self: self.root / ".lock")

    def task(self, name: str) -> RunDir:
        """LoRA-ST: the directory of task ``name``'s own run."""
        return RunDir(self.tasks_root / name)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for one writer: a second run into it fails at once with ``RunDirInUse``.

        An advisory ``flock`` on ``.lock``: the kernel releases it when the holder exits or crashes, so
        a killed run never leaves a stale lock behind. The file records the holder's pid for the message.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirInUse(
                    f"run directory {self.root} is in use by another metalora process (pid {holder}); "
                    "wait for it to finish or train into another name="
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_config(self) -> dict[str, Any] | None:
        """The resolved recipe saved with the run (None where the directory has none)."""
        return yaml.safe_load(self.config.read_text(encoding="utf-8")) if self.config.is_file() else None


def task_adapters(run_dir: str | Path) -> dict[str, Path]:
    """``{task: adapter directory}`` of a LoRA-ST run (``runs/NAME/tasks/<task>/adapter``); empty for
    anything else, including a run with one shared ``adapter/``."""
    run = RunDir(run_dir)
    if not run.tasks_root.is_dir() or (run.adapter / CONFIG_FILE).is_file():
        return {}
    found = (run.task(p.name).adapter for p in sorted(run.tasks_root.iterdir()) if p.is_dir())
    return {p.parent.name: p for p in found if (p / CONFIG_FILE).is_file()}


def adapter_dir(source: str | Path, task: str | None = None) -> Path:
    """The adapter directory of a run directory (``runs/NAME/adapter``; for a LoRA-ST run, ``task``'s
    ``runs/NAME/tasks/<task>/adapter``) or the directory itself."""
    source = Path(source)
    if (source / CONFIG_FILE).is_file():
        return source
    if (RunDir(source).adapter / CONFIG_FILE).is_file():
        return RunDir(source).adapter
    per_task = task_adapters(source)
    if per_task:
        if task in per_task:
            return per_task[task]
        problem = "pass --task NAME" if task is None else f"it has no adapter for task {task!r}"
        raise FileNotFoundError(
            f"{source} is a LoRA-ST run with one adapter per task ({', '.join(per_task)}): {problem}"
        )
    raise FileNotFoundError(
        f"{source} is neither a metalora adapter directory nor a run directory with adapter/ "
        "(or tasks/<task>/adapter/ for LoRA-ST)"
    )


def load_adapted(source: str | Path, base: str | None = None, task: str | None = None) -> nn.Module:
    """The base model recorded with the adapter (or ``base``), with the adapter loaded (a LoRA-ST run's:
    ``task``'s)."""
    directory = adapter_dir(source, task)
    base_name = base or read_adapter_record(directory).get("base_model")
    if not base_name:
        raise ValueError(f"{directory}: the adapter records no base model; pass --base")
    model, _ = load_base(base_name)
    return load_adapter(model, directory)
