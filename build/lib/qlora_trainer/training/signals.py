"""Stopping at a step boundary: SIGINT and SIGTERM become a flag the loop reads, and `Interrupted` carries the exit."""

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; a checkpoint was written at the step boundary."""

    def __init__(self, signum: int, checkpoint_dir: Optional[Path]):
        super().__init__(f"stopped by signal {signum}; checkpoint at {checkpoint_dir}")
        self.exit_code = 128 + signum


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag (the list of signals received) the loop reads at the next step boundary."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
