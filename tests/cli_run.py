"""Run the ``bnfold`` command line in this process or in a child process, with one result shape.

``run_cli`` calls ``bnfold.cli.main.main(argv)`` (the console script's entry point: exit-code
mapping, logging and warning lines included) with stdout and stderr captured apart, so a test
asserts on ``returncode``, ``stdout`` and ``stderr`` as it would on a ``subprocess.run`` result,
without paying an interpreter start and the onnx/onnxruntime imports per command.

What a fresh process would see is recreated for the call: the working directory (``cwd``), the
environment (``env`` entries set, ``$GITHUB_STEP_SUMMARY`` removed unless ``env`` sets it, and
``$COLUMNS`` 80 where unset, the width a pipe gives click's help), Python's default warning
filters (pytest turns DeprecationWarnings on) and non-terminal streams. The ``bnfold`` logger, which
``main`` sets up for terminal lines, is put back as it was afterwards, so later tests see it unchanged.

``run_process`` runs ``python -m bnfold.cli.main`` in a child process; it is kept for the tests
that prove process behaviour (the exit status of a real process, what goes to which stream).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from bnfold.cli.main import main

STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``$GITHUB_STEP_SUMMARY`` (so a test run inside GitHub
    Actions never writes into the real job summary), updated with ``env``."""
    base = {k: v for k, v in os.environ.items() if k != STEP_SUMMARY}
    base.update(env or {})
    return base


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _working_directory(cwd: Path | None) -> Iterator[None]:
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _logger_restored(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    try:
        yield
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


@contextlib.contextmanager
def _default_warning_filters() -> Iterator[None]:
    """Python's filters in a fresh interpreter (DeprecationWarning and friends ignored); setting
    them also resets the "shown once" registries, as a new process would start with none."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


def run_cli(*args: object, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``bnfold ARGS`` in this process: (exit code, stdout, stderr) as a CompletedProcess."""
    argv = [str(a) for a in args]
    full_env = child_env(env)
    full_env.setdefault("COLUMNS", "80")
    out, err = io.StringIO(), io.StringIO()
    with _environment(full_env), _working_directory(cwd), _default_warning_filters(), _logger_restored("bnfold"), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(["bnfold", *argv], rc, out.getvalue(), err.getvalue())


def run_process(*args: object, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m bnfold.cli.main ARGS`` in a child process."""
    return subprocess.run([sys.executable, "-m", "bnfold.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=child_env(env), timeout=timeout)
