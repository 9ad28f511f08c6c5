"""The files one run writes, moved into place together (standard library only).

Every output (the folded model, ``--frozen-output``, the reports) is written into a private
staging folder beside its target (``.bnfold-XXXXXXXX/``, so the final rename stays on one file
system) and nothing reaches a target path until :meth:`Outputs.commit`, which moves them all at
once. A run that ends in an error never commits: it leaves none of its outputs, and the old files
at those paths are untouched.

What bnfold deletes, and why it is provably its own:

* its staging folders. Each one is created while its parent folder is locked, holds an exclusive
  ``flock`` for as long as its run lives, and contains the marker file :data:`MARKER`. A later run
  that writes into the same folder removes a staging folder left by a run that was killed
  (SIGKILL, power loss) only when all of that holds: the name is ``.bnfold-`` plus 8 characters,
  it is a real folder (not a link) owned by the same user, nobody holds its lock (the kernel
  drops a lock when its process dies), and the marker is there.
* files handed to :meth:`Outputs.add` as ``cleanup``, after the new file is in place (for ONNX:
  data files of earlier writes of the same output; see ``bnfold.onnx.io.stale_data_files``).

Concurrent runs that write into one folder serialise their commits (and the sweep of leftovers)
on an advisory ``flock`` of the folder itself; no lock file is created. The end state of runs
racing for one path is always one complete output of one of them.

A target that is a symbolic link is replaced by the new file; the link's target is never written
(following a link planted in a shared folder would let its owner redirect bnfold's write).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bnfold.errors import BadInputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; leftovers are never swept there
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER", "Outputs", "folder_lock", "sweep_leftovers"]

STAGE_PREFIX = ".bnfold-"
MARKER = ".bnfold-staging"
# tempfile.mkdtemp's names: the prefix and 8 characters of its alphabet
_STAGE_NAME = re.compile(r"\.bnfold-[a-z0-9_]{8}\Z")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a staging folder is made and registered, while outputs
    move into place, and while staging folders are removed, then deliver the first one that came:
    an interrupt never leaves half of one of these done. Python runs signal handlers in the main
    thread whichever thread the kernel delivered the signal to, so the handlers themselves are
    swapped for one that only records the signal (a thread's signal mask would not do). Main thread
    only (the only one that may set handlers, and the only one they run in)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {}
    for sig in _HELD:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: came.append(signum))
        except (OSError, ValueError):  # not settable here
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if came:
            signal.raise_signal(came[0])


def _folder_key(folder: Path) -> tuple[int, int]:
    """A folder's identity (device, inode): two paths to one folder (a bind mount, a link) are one."""
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _lock(fd: int, *, wait: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (``flock`` on the folder itself)."""
    fd = os.open(folder, _DIR_FLAGS)
    try:
        _lock(fd, wait=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` that runs killed before their end left behind
    (see the module docstring for what makes one provably abandoned); call with ``folder``
    locked. Returns what was removed."""
    if fcntl is None:
        return []
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not _STAGE_NAME.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            fd = os.open(entry.path, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _lock(fd, wait=False):
                continue  # a live run's folder
            marker = os.path.join(entry.path, MARKER)
            if os.path.isfile(marker) and not os.path.islink(marker):  # else: not provably ours, kept
                shutil.rmtree(entry.path, ignore_errors=True)
                if not os.path.lexists(entry.path):
                    removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


class _Stage:
    """One staging folder: created (after a sweep) while its parent is locked, then locked itself;
    ``register`` is called with it before any signal can end the run (see ``_signals_held``)."""

    def __init__(self, folder: Path, register: Callable[[_Stage], None]) -> None:
        self.fd = -1
        self.count = 0
        with folder_lock(folder):  # waiting for the lock: interruptible
            sweep_leftovers(folder)
            with _signals_held():
                self.path = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))
                register(self)
            try:
                self.fd = os.open(self.path, _DIR_FLAGS)
                _lock(self.fd, wait=True)
                (self.path / MARKER).write_text(
                    f"staging folder of a bnfold run (pid {os.getpid()}); bnfold removes it when the run ends, "
                    "or in a later run once this one is gone\n", encoding="utf-8")
            except BaseException:
                self.close()
                raise

    def new_path(self, target: Path) -> Path:
        """A fresh short path in the folder (long target names would not fit with a suffix)."""
        self.count += 1
        return self.path / f"o{self.count}{target.suffix[:16]}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Pending:
    target: Path
    staged: Path
    companions: Sequence[Path] = ()  # moved beside the target first, under their own (fresh) names
    # called once the target is in place, with the target and Outputs.is_protected (files never to delete)
    cleanup: Callable[[Path, Callable[[Path], object]], None] | None = None
    moved: list[Path] = field(default_factory=list)
    replaced: bool = False  # something was at the target before
    backup: Path | None = None  # the old file (a hard link, else renamed away), to restore on a failure


class Outputs:
    """The outputs of one run (a context manager): :meth:`path_for` gives where to write one,
    :meth:`add` registers it, :meth:`commit` moves all registered ones into place. Leaving the
    ``with`` block removes the staging folders and whatever was not committed."""

    def __init__(self) -> None:
        self._stages: dict[Path, _Stage] = {}  # by the folder's real path: a rename never crosses a mount
        self._pending: list[_Pending] = []
        self._scratch: list[Path] = []
        self._protected: dict[tuple[int, int], str] = {}  # (device, inode) -> what the file is

    def protect(self, what: str, *paths: str | os.PathLike[str] | None, named: bool = False) -> None:
        """Never replace or delete these files (an input: the model, its external data): an output
        at one of them is refused (:meth:`add`), and cleanups skip them (:meth:`is_protected`).
        Each is described as ``what`` and its path, or as ``what`` alone where ``named`` (``what``
        names its owner: "a data file of the input model M.onnx")."""
        for path in paths:
            if path is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            self._protected.setdefault((st.st_dev, st.st_ino), what if named else f"{what} {path}")

    def is_protected(self, path: str | os.PathLike[str]) -> str | None:
        """What ``path`` is, where it is a file :meth:`protect` named (links followed), else None."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return self._protected.get((st.st_dev, st.st_ino))

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with _signals_held():
            self._pending.clear()
            for stage in self._stages.values():
                stage.close()
            self._stages.clear()
            for folder in self._scratch:
                shutil.rmtree(folder, ignore_errors=True)
            self._scratch.clear()

    def _stage(self, target: Path) -> _Stage:
        folder = target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            key = folder.resolve()
            stage = self._stages.get(key)
            if stage is None:
                stage = _Stage(folder, lambda new: self._stages.__setitem__(key, new))
        except OSError as exc:
            raise BadInputError(
                f"cannot write {target}: {folder} is not a folder bnfold can write in "
                f"({exc.strerror or type(exc).__name__}); give the output a path in a writable folder") from exc
        return stage

    def path_for(self, target: str | os.PathLike[str]) -> Path:
        """Where to write ``target`` before :meth:`add`: a new path in the staging folder beside it."""
        return self._stage(Path(target)).new_path(Path(target))

    def scratch(self, near: str | os.PathLike[str] | None = None) -> Path:
        """A new, empty folder for files that are never published (e.g. a verification reference),
        removed with the staging: inside the staging folder beside ``near`` (so a killed run's
        copy is swept like the rest), or a private temporary folder."""
        if near is not None:
            stage = self._stage(Path(near))
            stage.count += 1
            folder = stage.path / f"s{stage.count}"
            folder.mkdir()
            return folder
        with _signals_held():
            folder = Path(tempfile.mkdtemp(prefix="bnfold-"))
            self._scratch.append(folder)
        return folder

    def add(self, target: str | os.PathLike[str], staged: Path, *, companions: Sequence[Path] = (),
            cleanup: Callable[[Path, Callable[[Path], object]], None] | None = None) -> None:
        """Register ``staged`` (written at a :meth:`path_for` path) to become ``target`` on commit;
        ``companions`` (in the same staging folder) move beside it first, keeping their names."""
        target = Path(target)
        what = self.is_protected(target)
        if what is not None:
            raise BadInputError(f"{target} is {what}; bnfold never overwrites its input: give the output another path")
        self._pending = [p for p in self._pending if p.target != target]
        self._pending.append(_Pending(target, staged, tuple(companions), cleanup))

    def write_text(self, target: str | os.PathLike[str], text: str) -> None:
        """Stage a text file (UTF-8, ``\\n`` line ends) for ``target``."""
        staged = self.path_for(target)
        try:
            with open(staged, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
        except OSError as exc:
            raise BadInputError(f"cannot write {target}: {exc.strerror or type(exc).__name__}") from exc
        self.add(target, staged)

    @property
    def targets(self) -> list[Path]:
        return [p.target for p in self._pending]

    def commit(self) -> list[Path]:
        """Move every registered output into place, all folders locked; on a failure, undo the
        moves already made (old files restored where they could be kept) and raise. Then run the
        cleanups. Returns the targets written."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        folders: dict[tuple[int, int], Path] = {}
        for p in pending:
            folders.setdefault(_folder_key(p.target.parent), p.target.parent)
        with contextlib.ExitStack() as locks:
            for key in sorted(folders):  # one order for every run: no deadlock between two of them
                locks.enter_context(folder_lock(folders[key]))
            locks.enter_context(_signals_held())  # the moves: all or none, a signal comes after
            done: list[_Pending] = []
            for p in pending:
                try:
                    self._move(p)
                except OSError as exc:
                    for q in reversed([*done, p]):
                        _undo(q)
                    raise BadInputError(f"cannot write {p.target}: {exc.strerror or type(exc).__name__}; nothing "
                                        "was written") from exc
                done.append(p)
            for p in done:
                if p.backup is not None:
                    with contextlib.suppress(OSError):
                        p.backup.unlink()
                if p.cleanup is not None:
                    p.cleanup(p.target, self.is_protected)
        return [p.target for p in pending]

    def _move(self, p: _Pending) -> None:
        for c in p.companions:
            dest = p.target.parent / c.name
            if os.path.lexists(dest):  # a fresh random name: never someone else's file
                raise FileExistsError(17, "a file of that name exists", str(dest))
            os.replace(c, dest)
            p.moved.append(dest)
        p.replaced = os.path.lexists(p.target)
        if p.replaced:
            backup = p.staged.with_name(p.staged.name + ".old")
            try:
                os.link(p.target, backup, follow_symlinks=False)
            except OSError:  # no hard link here (file system, protected_hardlinks): move it away instead
                os.replace(p.target, backup)
            p.backup = backup
        os.replace(p.staged, p.target)
        p.moved.append(p.target)


def _undo(p: _Pending) -> None:
    for path in reversed(p.moved):
        with contextlib.suppress(OSError):
            if path != p.target or not p.replaced:
                path.unlink()
            elif p.backup is not None:
                os.replace(p.backup, path)
    if p.target not in p.moved and p.backup is not None and not os.path.lexists(p.target):
        with contextlib.suppress(OSError):  # moved away, then the replace failed: put it back
            os.replace(p.backup, p.target)
    p.moved.clear()
