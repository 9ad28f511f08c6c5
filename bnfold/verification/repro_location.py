"""Where a repro bundle goes (see :mod:`bnfold.verification.repro` for what it holds).

Standard library only, so the CLI can decide the folder (:func:`default_location`,
:func:`replaceable`) before it imports onnx or onnxruntime. :func:`choose` picks the folder a bundle
is written to, :func:`swap_into_place` renames a finished bundle there.

bnfold deletes only what it provably wrote. A bundle's ``repro.json`` carries bnfold's marker
(:func:`marker`): ``"bnfold_repro"`` (the bundle format), ``"bnfold_version"``, ``"files"`` (every
other file of the bundle with its size) and ``"folders"``. A folder is an earlier bundle
(:func:`is_bundle`) only when it holds exactly those files with those sizes and those folders: no
other file or folder, no symbolic link, nothing but regular files and folders. When one is replaced,
only the files it lists are deleted (:func:`swap_into_place`). Bundles written before the marker
existed are not recognised: the CLI refuses such a ``--repro-dir`` (exit 2) and the default place
moves on to ``<name>-1``, ....
"""
from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from bnfold.version import __version__

__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "DEFAULT_DIR", "choose", "default_location", "is_bundle", "marker",
           "replaceable", "swap_into_place"]

log = logging.getLogger(__name__)

BUNDLE_FILE = "repro.json"
BUNDLE_FORMAT = 1  # repro.json's "bnfold_repro": the layout of the bundle and of its "files" list
DEFAULT_DIR = "bnfold-repro"
_MAX_TRIES = 100  # <name>, <name>-1, ..., <name>-99
_Tree = dict[str, "_Tree | None"]  # a folder: name -> sub-folder, or None for a file


# --------------------------------------------------------------------------- where


def default_location(report_path: str | os.PathLike[str] | None) -> Path:
    """The CLI's bundle folder when ``--repro-dir`` is not given: ``<REPORT without suffix>.repro``
    beside the JSON report (``out/verify.json`` -> ``out/verify.repro``), else ``bnfold-repro`` in
    the current folder."""
    if report_path is not None:
        return Path(report_path).with_suffix(".repro")
    return Path(DEFAULT_DIR)


# --------------------------------------------------------------------------- what bnfold wrote


def _contents(folder: Path, limit: int | None = None) -> tuple[dict[str, int], set[str]] | None:
    """Every regular file under ``folder`` (relative POSIX path -> size) and every sub-folder, walked
    without following links; None when anything else is there (a link, a FIFO, a device, a socket),
    when ``folder`` cannot be read, or when more than ``limit`` entries are found."""
    files: dict[str, int] = {}
    folders: set[str] = set()

    def walk(d: Path, rel: PurePosixPath) -> bool:
        try:
            with os.scandir(d) as it:
                listed = list(it)
            for e in listed:
                if limit is not None and len(files) + len(folders) >= limit:
                    return False
                mode = e.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    folders.add(str(rel / e.name))
                    if not walk(Path(e.path), rel / e.name):
                        return False
                elif stat.S_ISREG(mode):
                    files[str(rel / e.name)] = e.stat(follow_symlinks=False).st_size
                else:
                    return False
        except OSError:
            return False
        return True

    return (files, folders) if walk(folder, PurePosixPath()) else None


def marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``repro.json`` carries so that a later run can recognise the bundle in ``folder`` (all
    its files written, ``repro.json`` not yet): the format, bnfold's version, every file with its
    size and every sub-folder."""
    found = _contents(Path(folder))
    if found is None:
        raise OSError(f"{folder} holds something other than files and folders; not a bundle")
    files, folders = found
    files.pop(BUNDLE_FILE, None)
    return {"bnfold_repro": BUNDLE_FORMAT, "bnfold_version": __version__, "files": dict(sorted(files.items())),
            "folders": sorted(folders)}


def _relative(name: object) -> bool:
    """Whether ``name`` is a plain relative POSIX path inside the bundle (no ``..``, no ``.``)."""
    if not isinstance(name, str) or "\\" in name:
        return False
    p = PurePosixPath(name)
    return bool(p.parts) and not p.is_absolute() and str(p) == name and ".." not in p.parts


def _listed(doc: object) -> tuple[dict[str, int], set[str]] | None:
    """The files and folders a ``repro.json`` document lists, when it carries bnfold's marker."""
    if not isinstance(doc, dict) or doc.get("bnfold_repro") != BUNDLE_FORMAT:
        return None
    files, folders = doc.get("files"), doc.get("folders")
    if (not isinstance(doc.get("bnfold_version"), str) or not isinstance(doc.get("command"), str)
            or not isinstance(files, dict) or not isinstance(folders, list)):
        return None
    if not all(_relative(n) and type(v) is int for n, v in files.items()) or BUNDLE_FILE in files:
        return None
    if not all(_relative(n) for n in folders):
        return None
    return dict(files), set(folders)


def _bundle_contents(path: Path) -> tuple[dict[str, int], set[str]] | None:
    """The files (its ``repro.json`` excluded) and folders of the bundle at ``path`` when ``path``
    is exactly a bundle bnfold wrote; None otherwise."""
    if path.is_symlink() or not path.is_dir():
        return None
    doc_path = path / BUNDLE_FILE
    try:
        if not stat.S_ISREG(doc_path.lstat().st_mode):
            return None
        listed = _listed(json.loads(doc_path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
    if listed is None:
        return None
    files, folders = listed
    present = _contents(path, limit=len(files) + len(folders) + 2)  # one more than a bundle: stop early
    if present is None or present[0].pop(BUNDLE_FILE, None) is None:
        return None
    return listed if present == listed else None


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding exactly a bundle bnfold wrote: its ``repro.json`` carries
    bnfold's marker (:func:`marker`), and the folder holds the files it lists, with their sizes, the
    folders it lists, and nothing else (no symbolic link anywhere). A link is never a bundle."""
    return _bundle_contents(Path(path)) is not None


def replaceable(path: str | os.PathLike[str]) -> bool:
    """Whether a bundle may be written at ``path``: nothing is there, an empty folder, or a bundle."""
    p = Path(path)
    if p.is_symlink():
        return False
    if not p.exists():
        return True
    if not p.is_dir():
        return False
    try:
        empty = next(p.iterdir(), None) is None
    except OSError:
        return False
    return empty or is_bundle(p)


def choose(requested: Path) -> Path:
    """``requested`` when a bundle may be written there, else the first such ``<name>-1``, ..."""
    for k in range(_MAX_TRIES):
        candidate = requested if k == 0 else requested.with_name(f"{requested.name}-{k}")
        if replaceable(candidate):
            return candidate
    raise FileExistsError(f"{requested} and {requested.name}-1 .. -{_MAX_TRIES - 1} beside it all exist and are "
                          "not bnfold repro bundles")


# --------------------------------------------------------------------------- replacing


def _tree(files: Iterable[str], folders: Iterable[str]) -> _Tree:
    root: _Tree = {}
    for name, is_folder in [*((f, True) for f in folders), *((f, False) for f in files)]:
        *dirs, leaf = PurePosixPath(name).parts
        node: _Tree | None = root
        for d in dirs:
            node = node.setdefault(d, {}) if node is not None else None
        if node is not None:  # None: a file listed as a folder too; never in a bundle that was checked
            node.setdefault(leaf, {} if is_folder else None)
    return root


def _remove_listed(dir_fd: int, tree: _Tree) -> bool:
    """Unlink the files of ``tree`` below the open folder ``dir_fd`` and remove its folders once
    empty; sub-folders are opened without following links. False when anything was left."""
    whole = True
    for name, sub in tree.items():
        if sub is None:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except OSError:
                whole = False
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError:
            whole = False
            continue
        try:
            whole = _remove_listed(fd, sub) and whole
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=dir_fd)  # fails when anything else is in it: that stays
        except OSError:
            whole = False
    return whole


def _remove_bundle(folder: Path, files: Iterable[str], folders: Iterable[str]) -> None:
    """Delete what the bundle at ``folder`` lists (and its ``repro.json``), then the folder when
    empty; anything else found there is left, with a warning."""
    whole = False
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        pass
    else:
        try:
            whole = _remove_listed(fd, _tree([*files, BUNDLE_FILE], folders))
        finally:
            os.close(fd)
        try:
            os.rmdir(folder)
        except OSError:
            whole = False
    if not whole:
        log.warning("left %s behind: it holds files the earlier repro bundle did not list", folder)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished bundle ``tmp`` to ``target``, replacing an empty folder or an old bundle.

    The old folder is first renamed aside and checked there, so what is checked is what is deleted:
    a folder that turned into something else since :func:`choose` is renamed back and refused
    (``FileExistsError``). Only the files the old bundle lists are deleted."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)  # a non-empty folder that appears meanwhile makes this fail: kept
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a bnfold repro bundle")
    old = target.with_name(f".{target.name}.old-{os.urandom(4).hex()}")
    os.rename(target, old)
    try:
        empty = next(old.iterdir(), None) is None
    except OSError:
        empty = False
    listed = ({}, set()) if empty else _bundle_contents(old)
    if listed is None:  # appeared since we chose it: give it back untouched
        os.rename(old, target)
        raise FileExistsError(f"{target} exists and is not a bnfold repro bundle")
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    if empty:
        try:
            os.rmdir(old)
        except OSError:
            log.warning("left %s behind: files appeared in it while the repro bundle was written", old)
    else:
        _remove_bundle(old, *listed)
