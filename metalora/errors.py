"""Errors the ``metalora`` command turns into one line and an exit status, kept free of heavy imports so
that the command can catch them without importing torch (a fast ``--help``)."""

from __future__ import annotations

import signal
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, does not fit the run resuming from it, or could not be written."""


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; the run resumes when started again."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
            "written. Run the same command again to resume"
        )
