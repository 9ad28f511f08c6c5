"""What is at a path bnfold is asked to write (standard library only: the CLI checks its outputs
with it before importing anything heavy, the library before it writes)."""
from __future__ import annotations

import os
import stat

from bnfold.errors import BadInputError

__all__ = ["check_not_input", "check_output_paths", "not_a_regular_file", "same_file"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it exists and is not a regular file (symbolic links followed), else
    None. bnfold writes by renaming a finished temporary file onto the path, which would replace a
    device, a FIFO or a socket with a regular file (as root: ``/dev/null`` itself)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing (or unreadable: the write itself reports that)
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def check_output_paths(**paths: str | os.PathLike[str] | None) -> None:
    """Raise ``BadInputError`` for an output (given by parameter name) that exists and is not a
    regular file, before any work: nothing is written or replaced then."""
    for what, path in paths.items():
        text = os.fsdecode(path) if isinstance(path, (str, bytes)) else None
        if text is not None and text.endswith(("/", os.sep)):
            raise BadInputError(f"{what} {text!r} ends with a path separator, so it names a folder; bnfold writes "
                                f"one file: give a file path such as {text}model.onnx")
        kind = not_a_regular_file(path) if path is not None else None
        if kind is not None:
            raise BadInputError(f"{what} {path} is {kind}, not a regular file; bnfold writes only regular files: "
                                "give the path of a file, or a new path")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode where both exist, else the same path
    once links are resolved; False where that cannot be told."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def check_not_input(source: str | os.PathLike[str] | None, **paths: str | os.PathLike[str] | None) -> None:
    """Raise ``BadInputError`` for an output (given by parameter name) that is the input file
    ``source``: bnfold never overwrites its input."""
    if source is None:
        return
    for what, path in paths.items():
        if path is not None and same_file(source, path):
            raise BadInputError(f"{what} {path} is the input model; bnfold never overwrites its input: give "
                                "another path")
