"""SIGINT and SIGTERM while training: finish the step, write a checkpoint, exit with 130 / 143.

Inside ``deferred_signals()`` the two signals only record that they came; the engine checks after every
optimizer step (all ranks agree through one all-reduce), writes a checkpoint and raises ``RunInterrupted``,
which the command turns into its exit status 128 + signal number. Running the same command again resumes
from that checkpoint. A second signal of the same kind while the step finishes acts at once, as usual
(Ctrl-C twice interrupts immediately).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_signals() -> Iterator[Callable[[], int | None]]:
    """Within the block, SIGINT/SIGTERM are recorded instead of acted on; yields ``caught()``, the first
    signal number received (None if none). Outside the main thread (where handlers cannot be set) it
    defers nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in DEFERRED}

    def record(signum: int, frame) -> None:
        if signum in caught:  # the same signal again: act on it now
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
        caught.append(signum)

    for sig in DEFERRED:
        signal.signal(sig, record)
    try:
        yield lambda: caught[0] if caught else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
