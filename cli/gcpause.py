"""Python's cyclic garbage collector, paused while the CLI runs a command.

Planning and folding create and drop many small objects (index lists, numpy views, protobuf
wrappers) but make no reference cycles worth collecting. The collector would still walk every
tracked object each time its allocation thresholds trip: on a chain of 2000 Conv→BN blocks that
was a third of the fold's time. Reference counting frees memory as usual while it is paused;
the collector is switched back on (if it was on) when the block ends, also on error.

Only the CLI pauses it, around the whole command: it owns its process. The library does not: a
call inside a service must not switch off collection for the service's other threads.
(``bnfold.torch.calibrate`` sets the objects that exist before it aside, ``gc.freeze``, which
leaves the collector on; with the collector off, as here, its batch loop makes the young
collections itself, so a forward's reference cycles are freed batch by batch:
``bnfold.torch.calibrate.collect_young``.)
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic collector for the block (switched back on afterwards if it was on)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
