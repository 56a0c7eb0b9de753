"""Atomic training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint ``checkpoints/step-00000012/`` holds

* ``adapter.safetensors`` — the adapter tensors (``adapter_parameters``), nothing else of the model;
* ``state.safetensors`` + ``state.json`` — optimizer state, LR scheduler, sampler state, counters,
  step (tensors go to safetensors, the structure to JSON; ``state.json`` is written last);
* ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json`` — Python, NumPy, torch CPU and CUDA RNG states of
  every rank.

* ``manifest.json`` — the SHA-256 and size of every other file, written last.

The directory is assembled as ``.tmp-step-…`` (each file written temp+fsync+rename by
``metalora.atomic``) and renamed into place in one ``os.replace``; only then is ``checkpoints/latest``
rewritten (atomically) to name it. A crash at any moment leaves the previous checkpoint intact and
``latest`` pointing at a complete one. A write that fails (a full disk) removes the partial directory and
raises, naming the checkpoint that is still intact. On resume, ``latest_valid`` checks the manifest: a
truncated or corrupted checkpoint is reported and the newest older one that verifies is used.
"""

from __future__ import annotations

import hashlib
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
from metalora.errors import CheckpointError
from metalora.train import distributed as dist_utils

FORMAT_VERSION = 1
LATEST = "latest"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"
STATE_TENSORS = "state.safetensors"
MANIFEST = "manifest.json"


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
    """Write checkpoint ``step`` under ``root`` (every rank calls this; rank 0 writes the shared files).

    A failed write leaves the previous checkpoint as it was and raises ``CheckpointError``."""
    root = Path(root)
    rank = dist_utils.rank()
    tmp, final = root / f".tmp-{step_dir_name(step)}", root / step_dir_name(step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    try:
        _write_packed(tmp, f"rng-rank{rank}", rng_state())
        dist_utils.barrier()
        if rank == 0:
            atomic.write_safetensors(tmp / ADAPTER_FILE, dict(adapter))
            _write_packed(tmp, "state", {"format_version": FORMAT_VERSION, "step": step, **state})
            atomic.write_json(tmp / MANIFEST, manifest(tmp))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            atomic.write_text(root / LATEST, final.name + "\n")
            _prune(root, keep)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = (root / LATEST).read_text(encoding="utf-8").strip() if (root / LATEST).is_file() else None
        raise CheckpointError(
            f"writing checkpoint {final} failed ({exc.strerror or exc}); the previous checkpoint "
            f"{previous or '(none)'} is intact. Free space or fix the directory, then run again to resume"
        ) from exc
    dist_utils.barrier()
    return final


def manifest(directory: Path) -> dict[str, Any]:
    """``{"files": {name: {"sha256", "bytes"}}}`` of every file in a checkpoint directory."""
    files = {}
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST):
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    return {"format_version": FORMAT_VERSION, "files": files}


def verify(directory: Path) -> None:
    """Raise ``CheckpointError`` naming the first file of ``directory`` that is missing, truncated or
    corrupted against its manifest."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no {MANIFEST}: incomplete or written by an older metalora"
        )
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupted ({exc})") from None
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory}: {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {directory}: {name} is truncated ({file.stat().st_size} bytes, expected {expected['bytes']})"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: {name} is corrupted (its SHA-256 does not match)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latest(root: Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names (complete by construction), or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    directory = Path(root) / pointer.read_text(encoding="utf-8").strip()
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {directory.name}, which is missing or incomplete")
    return directory


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that verifies against its manifest, the problems of newer ones skipped).

    The one ``latest`` names comes first, then the other step directories from newest to oldest."""
    root = Path(root)
    pointer = root / LATEST
    named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    steps = sorted((p.name for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    candidates = ([named] if named else []) + [name for name in steps if name != named]
    problems: list[str] = []
    for name in candidates:
        try:
            verify(root / name)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        return root / name, problems
    return None, problems


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
