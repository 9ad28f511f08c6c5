"""Python's cyclic garbage collector, paused while a graph is rewritten.

Planning and folding create and drop many small objects (index lists, numpy views, protobuf
wrappers) but make no reference cycles worth collecting. The collector would still walk every
tracked object each time its allocation thresholds trip: on a chain of 2000 Conv→BN blocks that
was a third of the fold's time. Reference counting frees memory as usual while it is paused;
the collector is switched back on (if it was on) when the block ends, also on error.
"""
from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from typing import Callable, Iterator, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def paused_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def without_gc(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``func`` with the cyclic collector paused."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused_gc():
            return func(*args, **kwargs)

    return wrapper
