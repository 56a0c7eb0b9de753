"""Atomic training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint ``checkpoints/step-00000012/`` holds

* ``adapter.safetensors`` — the adapter tensors (``adapter_parameters``), nothing else of the model;
* ``state.safetensors`` + ``state.json`` — optimizer state, LR scheduler, sampler state, counters,
  step (tensors go to safetensors, the structure to JSON; ``state.json`` is written last);
* ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json`` — Python, NumPy, torch CPU and CUDA RNG states of
  every rank.

The directory is assembled as ``.tmp-step-…`` (each file written temp+fsync+rename by
``metalora.atomic``) and renamed into place in one ``os.replace``; only then is ``checkpoints/latest``
rewritten (atomically) to name it. A crash at any moment leaves the previous checkpoint intact and
``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from metalora import atomic
from metalora.train import distributed as dist_utils

FORMAT_VERSION = 1
LATEST = "latest"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"
STATE_TENSORS = "state.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run resuming from it."""


# --- packing nested Python state into (JSON, tensors) ------------------------------------------------


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of ``obj``; tensors and arrays move into ``tensors`` under keys starting with ``prefix``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors, prefix), pack(v, tensors, prefix)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint a value of type {type(obj).__name__}: {obj!r:.80}")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``pack``."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    return obj


def _write_packed(directory: Path, stem: str, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = pack(state, tensors, prefix="t")
    atomic.write_safetensors(directory / f"{stem}.safetensors", tensors)
    atomic.write_json(directory / f"{stem}.json", structure)


def _read_packed(directory: Path, stem: str) -> dict[str, Any]:
    json_path, tensor_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not json_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: {json_path.name} or {tensor_path.name} missing"
        )
    return unpack(json.loads(json_path.read_text(encoding="utf-8")), load_file(str(tensor_path)))


# --- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load ------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save(
    root: Path, step: int, adapter: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` (every rank calls this; rank 0 writes the shared files)."""
    root = Path(root)
    rank = dist_utils.rank()
    tmp, final = root / f".tmp-{step_dir_name(step)}", root / step_dir_name(step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    _write_packed(tmp, f"rng-rank{rank}", rng_state())
    dist_utils.barrier()
    if rank == 0:
        atomic.write_safetensors(tmp / ADAPTER_FILE, dict(adapter))
        _write_packed(tmp, "state", {"format_version": FORMAT_VERSION, "step": step, **state})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic.write_text(root / LATEST, final.name + "\n")
        _prune(root, keep)
    dist_utils.barrier()
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    directory = Path(root) / pointer.read_text(encoding="utf-8").strip()
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {directory.name}, which is missing or incomplete")
    return directory


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter tensors, state, this rank's RNG state) of a checkpoint directory."""
    directory = Path(directory)
    state = _read_packed(directory, "state")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: format_version {state.get('format_version')}, expected {FORMAT_VERSION}"
        )
    adapter = load_file(str(directory / ADAPTER_FILE))
    rng_stem = f"rng-rank{dist_utils.rank()}"
    if not (directory / f"{rng_stem}.json").is_file():
        rng_stem = "rng-rank0"  # resumed with more processes than saved it: RNG only affects dropout
    return adapter, state, _read_packed(directory, rng_stem)


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
