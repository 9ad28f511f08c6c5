"""onnxruntime's telemetry writes a database under ``$XDG_CACHE_HOME`` (default ``~/.cache``:
``Microsoft/DeveloperTools/.onnxruntime/``) when it is imported, so a ``bnfold`` run as root in CI
would write into root's home folder. The command points ``XDG_CACHE_HOME`` at a private temporary
folder for the run (only where the user has not set it) and removes that folder afterwards:
nothing is written that is not bnfold's. Standard library only."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["private_cache"]

_VAR = "XDG_CACHE_HOME"


@contextlib.contextmanager
def private_cache() -> Iterator[None]:
    if os.environ.get(_VAR):  # the user chose where caches go
        yield
        return
    folder = tempfile.mkdtemp(prefix="bnfold-cache-")
    os.environ[_VAR] = folder
    try:
        yield
    finally:
        os.environ.pop(_VAR, None)
        shutil.rmtree(folder, ignore_errors=True)
