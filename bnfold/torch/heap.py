"""Keep glibc from handing a forward's activation memory back to the kernel between batches.

A CPU forward allocates and frees its activations, megabytes each, again for every batch. glibc
serves an allocation of at least its *mmap threshold* with a fresh ``mmap`` (unmapped again when
freed), and gives the top of its heap back to the kernel (``brk``) whenever more than its *trim
threshold* lies free there. Both thresholds start at 128 KiB; glibc raises them by itself
(threshold = the size of the largest mmapped block freed so far, at most 32 MiB; trim threshold
twice that) but only as large blocks come and go. Until then, every batch of a calibration
touches its activations in pages the kernel has to fault in and zero again: on ResNet-50 with
batches of 8x3x128x128, 8-20 thousand minor page faults per batch, 10-25 ms of a 160 ms batch,
and more when a copy of the weights has moved the heap's top (``tests/test_heap.py``,
``benchmarks/torch_one_shot.py``'s faults column).

:func:`settle_heap` does what a first large free would do: it allocates and frees one untouched
block just under 32 MiB (an ``mmap`` and a ``munmap``; no page of it is touched), so glibc's own
rule moves the thresholds to their usual ceiling (mmap threshold ~32 MiB, trim threshold ~64 MiB):
the process keeps up to ~64 MiB of freed heap for the next batch instead of returning it, and
blocks under 32 MiB come from the heap. That is the state glibc reaches in any process that
has freed one such block (a larger network's activations do); no ``mallopt`` setting is made, so
glibc's own adjustment stays on. When a calibration ends, :func:`release_heap` gives the freed
heap back (``malloc_trim(0)``), so the process does not keep a batch's worth of activations for
good; the next calibration's first batch faults them in again. A calibration run on another thread
allocates from that thread's own malloc arena, whose free top (up to the trim threshold, ~64 MiB)
``malloc_trim`` does not return (review23: 4 threads calibrating, RSS 30-50 MB over the code before
the settling). Only on glibc
(Linux); elsewhere, and where the C library cannot be reached, both do nothing.
"""
from __future__ import annotations

import ctypes
import functools
import os

__all__ = ["SETTLE_BYTES", "release_heap", "settle_heap"]

#: the block allocated and freed: under glibc's 32 MiB ceiling for the dynamic threshold, with room
#: for the block's header and page rounding (a larger block is mmapped but moves no threshold)
SETTLE_BYTES = (32 << 20) - (64 << 10)
_DONE = [False]
_SETTLED = [False]  # settle_heap raised the thresholds: release_heap then has freed heap to give back


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None  # "glibc 2.36"; musl, macOS: None or ValueError
    except (ValueError, OSError, AttributeError):
        return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The process's C library with ``malloc``, ``free`` and ``malloc_trim`` declared; None where
    it cannot be reached."""
    try:
        libc = ctypes.CDLL(None)
        malloc, free, trim = libc.malloc, libc.free, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return libc


def settle_heap() -> bool:
    """Raise glibc's mmap and trim thresholds to their usual ceiling, once per process (module
    docstring); True where the block was allocated and freed now."""
    if _DONE[0]:
        return False
    _DONE[0] = True
    libc = _libc() if _glibc() else None
    if libc is None:
        return False
    block = libc.malloc(SETTLE_BYTES)
    if not block:
        return False
    libc.free(block)
    _SETTLED[0] = True
    return True


def release_heap() -> bool:
    """Give the freed heap back to the kernel (``malloc_trim(0)``, every arena) once a calibration
    is over, where :func:`settle_heap` raised the thresholds: between its batches the pages are
    reused, but after it they would stay with the process, up to ~64 MiB per malloc arena (review23:
    four threads calibrating kept 50-75 MB more RSS than before the settling, for good). The
    thresholds stay up. True where it ran."""
    libc = _libc() if _SETTLED[0] else None
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
