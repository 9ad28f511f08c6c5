"""Progress bars on stderr: ``calibrating [#####.....] 12/40 batches`` while fold calibrates,
``verifying [#####.....] 4096/16384 model runs`` while a verification runs both models on each batch.

Drawn only when the stream is a terminal; elsewhere (pipes, CI logs, files) it draws nothing,
so logs stay free of carriage returns. The library calls ``progress(done, total)`` once per
batch (calibration) or model run (verification: ``VerifyConfig.progress``); ``total`` None (or
<= 0) means the number is not known in advance (a streamed data source): the bar then shows the
count alone, ``calibrating batch 12``.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

ProgressFn = Callable[[int, "int | None"], None]


class ProgressBar:
    """A one-line bar that rewrites itself in place with ``\\r``."""

    def __init__(self, stream: TextIO, label: str = "calibrating", unit: str = "batches",
                 width: int = 20, min_interval: float = 0.1, one: str = "batch") -> None:
        self.stream = stream
        self.label = label
        self.unit = unit
        self.one = one  # the unit of one item, shown before the count when there is no total
        self.width = width
        self.min_interval = min_interval
        self._last_draw = float("-inf")
        self._last_len = 0
        self._open = False  # a line is drawn and not yet ended by a newline

    def render(self, done: int, total: int | None) -> str:
        if total is not None and total > 0:
            done_clamped = max(0, min(done, total))
            filled = done_clamped * self.width // total
            bar = "#" * filled + "." * (self.width - filled)
            return f"{self.label} [{bar}] {done}/{total} {self.unit}"
        return f"{self.label} {self.one} {done}"

    def __call__(self, done: int, total: int | None) -> None:
        finished = total is not None and total > 0 and done >= total
        now = time.monotonic()
        if not finished and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        text = self.render(done, total)
        pad = " " * max(0, self._last_len - len(text))
        self.stream.write("\r" + text + pad)
        self._last_len = len(text)
        self._open = True
        if finished:
            self.close()
        else:
            self.stream.flush()

    def close(self) -> None:
        """End the drawn line (if any) so later output starts on a fresh line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
            self._last_len = 0


def make_progress(stream: TextIO | None = None, **kwargs: Any) -> ProgressBar | None:
    """A ``ProgressBar`` on ``stream`` (default stderr) when it is a terminal, else ``None``."""
    stream = sys.stderr if stream is None else stream
    try:
        is_tty = stream.isatty()
    except (AttributeError, ValueError):
        is_tty = False
    return ProgressBar(stream, **kwargs) if is_tty else None


@contextlib.contextmanager
def calibration_progress(stream: TextIO | None = None) -> Iterator[ProgressBar | None]:
    """Yield the callback to pass as ``progress=`` (or None), and end its line on the way out."""
    bar = make_progress(stream)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def verification_progress(stream: TextIO | None = None) -> Iterator[ProgressBar | None]:
    """Yield the callback for ``VerifyConfig.progress`` (or None off a terminal), and end its line on
    the way out."""
    bar = make_progress(stream, label="verifying", unit="model runs", one="model run")
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
