"""The error hierarchy. Each class maps to one CLI exit code (see ``cli/main.py``).

Messages are one line: what is wrong, and what to do about it.
"""
from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``exc``'s message on one line (whitespace runs collapsed; the class name if it is empty),
    cut to ``limit`` characters with ``...`` where it is longer."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (stripped of surrounding whitespace before the split;
    the class name if it is empty). For the messages of onnxruntime, whose later lines repeat
    context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BnfoldWarning(UserWarning):
    """A warning of bnfold's Python API where no report carries it (``bnfold.torch.calibrate``:
    a BN never called, statistics short of ``target_se``, a reused BN pooled)."""


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""

    exit_code = 3


class BadInputError(BnfoldError):
    """The model file, the calibration data or an option value is wrong (exit 3)."""

    exit_code = 3


class UnsupportedModelError(BnfoldError):
    """The model is valid but bnfold cannot process it (exit 3)."""

    exit_code = 3


class VerificationFailed(BnfoldError):
    """The folded model does not compute the frozen model's function within tolerance (exit 1)."""

    exit_code = 1


class ProviderUnavailable(BnfoldError):
    """A requested execution provider cannot run here (exit 4)."""

    exit_code = 4
