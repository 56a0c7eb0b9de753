"""Run output while training: ``metrics.jsonl`` (one JSON object per line), optional TensorBoard, a progress bar.

Only the main process writes. On resume the log is cut back to the checkpoint's step so that the
resumed file reads exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metalora import atomic


class MetricsLogger:
    def __init__(self, path: Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = _tensorboard_writer(self.path.parent / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_finite_or_str(record)) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drop step records beyond ``step`` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the crash
            if record.get("step", -1) <= step:
                kept.append(line)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard is optional
        raise ImportError(
            "logging.tensorboard=true needs the `tensorboard` package: pip install tensorboard"
        ) from exc
    return SummaryWriter(str(directory))


def _finite_or_str(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf: write them as strings so the line stays valid JSON.
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class Progress:
    """A tqdm bar over optimizer steps showing loss and samples/s; tqdm's own ETA is the remaining time."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str) -> None:
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True
        )

    def update(self, loss: float, samples_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
