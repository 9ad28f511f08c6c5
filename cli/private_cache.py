"""onnxruntime's telemetry writes a database under ``$XDG_CACHE_HOME`` (default ``~/.cache``:
``Microsoft/DeveloperTools/.onnxruntime/``) when it is imported, so a ``bnfold`` run as root in CI
would write into root's home folder. The command points ``XDG_CACHE_HOME`` at a private temporary
folder for the run (only where the user has not set it) and removes that folder afterwards:
nothing is written that is not bnfold's. The same telemetry writes a session file ``.ses`` into
``$TMPDIR`` (default ``/tmp``), following a symbolic link planted there: ``TMPDIR`` points at the
private folder too for the run. Python's own temporary folder (``tempfile``, where bnfold's
``bnfold-*`` folders go) is fixed before that, so it stays the user's. Standard library only."""
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
    folder = tempfile.mkdtemp(prefix="bnfold-cache-")  # fixes tempfile's folder first (gettempdir)
    saved = {var: os.environ.get(var) for var in (_VAR, "TMPDIR")}
    if not saved[_VAR]:  # else the user chose where caches go
        os.environ[_VAR] = folder
    os.environ["TMPDIR"] = folder
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        shutil.rmtree(folder, ignore_errors=True)
