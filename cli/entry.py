"""The ``bnfold`` console script's entry point: a Ctrl-C while the command's modules still import
(before :func:`bnfold.cli.main.main` handles signals; ~0.1 s of ~0.2, longer on a loaded CI
machine; the first ~0.1 s, ``import bnfold`` itself (numpy), is still not covered) ends
like one during the run: ``bnfold: interrupted``, exit 130, no traceback. Standard library only."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .signals import EXIT_INTERRUPTED

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from .main import main as run
    except KeyboardInterrupt:
        print("bnfold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run(argv)
