"""SIGTERM (``timeout``, a cancelled CI job, ``docker stop``) ends a run like Ctrl-C does: as an
exception, so every ``with`` block unwinds and no staging folder or temporary file is left behind
(exit 143, 128 + SIGTERM, as a shell reports it). Standard library only."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "terminate_as_interrupt"]

EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C: 130


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives (a BaseException, like KeyboardInterrupt:
    ``except Exception`` blocks do not swallow it)."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; the previous handler
    is restored afterwards, so an in-process caller keeps its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
