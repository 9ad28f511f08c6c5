"""Where a repro bundle goes (see :mod:`bnfold.verification.repro` for what it holds).

Standard library only, so the CLI can decide the folder (:func:`default_location`,
:func:`replaceable`) before it imports onnx or onnxruntime. :func:`choose` picks the folder a bundle
is written to, :func:`swap_into_place` renames a finished bundle there.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["BUNDLE_FILE", "DEFAULT_DIR", "choose", "default_location", "is_bundle", "replaceable",
           "swap_into_place"]

BUNDLE_FILE = "repro.json"
DEFAULT_DIR = "bnfold-repro"
_MAX_TRIES = 100  # <name>, <name>-1, ..., <name>-99


# --------------------------------------------------------------------------- where


def default_location(report_path: str | os.PathLike[str] | None) -> Path:
    """The CLI's bundle folder when ``--repro-dir`` is not given: ``<REPORT without suffix>.repro``
    beside the JSON report (``out/verify.json`` -> ``out/verify.repro``), else ``bnfold-repro`` in
    the current folder."""
    if report_path is not None:
        return Path(report_path).with_suffix(".repro")
    return Path(DEFAULT_DIR)


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a bundle bnfold wrote (its ``repro.json``, a JSON object
    with a ``command``). A symbolic link never is."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        doc = json.loads((p / BUNDLE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "command" in doc


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
    for k in range(_MAX_TRIES):
        candidate = requested if k == 0 else requested.with_name(f"{requested.name}-{k}")
        if replaceable(candidate):
            return candidate
    raise FileExistsError(f"{requested} and {requested.name}-1 .. -{_MAX_TRIES - 1} beside it all exist and are "
                          "not bnfold repro bundles")


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished bundle ``tmp`` to ``target``, replacing an empty folder or old bundle."""
    if target.exists() or target.is_symlink():
        if not replaceable(target):  # appeared since we chose it
            raise FileExistsError(f"{target} exists and is not a bnfold repro bundle")
        old = target.with_name(f".{target.name}.old-{os.urandom(4).hex()}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
