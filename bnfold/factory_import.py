"""``MODULE:CALLABLE`` factories, imported and called with one set of one-line errors.

``--model-factory`` (:func:`bnfold.torch.load.load_factory`) and ``--data-factory``
(:func:`bnfold.data.factory.call_data_factory`) both go through here: the current folder is put
on ``sys.path``, the module imported with importlib, the attribute looked up, and the call made;
a module that is missing, fails to import or calls ``sys.exit``, an attribute that is missing or
not callable, and a call that raises or exits are each a :class:`BadInputError` (exit 3).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from bnfold.errors import BadInputError, one_line

__all__ = ["call_factory", "cwd_on_path", "load_callable", "parse_factory"]


def cwd_on_path() -> None:
    """Put the current folder on ``sys.path`` (as ``python -m`` does) so its modules import."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def parse_factory(spec: str) -> tuple[str, str]:
    """``'pkg.mod:callable'`` -> ``('pkg.mod', 'callable')``; ValueError when malformed."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ValueError(f"{spec!r}: give MODULE:CALLABLE, e.g. mypkg.models:build_model")
    if not all(p.isidentifier() for p in module_name.split(".")) or not all(p.isidentifier() for p in attr.split(".")):
        raise ValueError(f"{spec!r}: MODULE and CALLABLE must be dotted Python names, e.g. mypkg.models:build_model")
    return module_name, attr


def load_callable(spec: str, noun: str = "factory") -> Callable[..., Any]:
    """The callable ``spec`` names; ``noun`` is how messages call it ("factory", "data factory")."""
    try:
        module_name, attr = parse_factory(spec)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    cwd_on_path()
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BadInputError(
            f"cannot import {noun} module '{module_name}' ({one_line(exc, 240)}); run bnfold from the folder that "
            "holds it or add that folder to PYTHONPATH") from exc
    except SystemExit as exc:  # sys.exit() at import: bnfold's exit code is its own, not the module's
        raise BadInputError(f"importing {noun} module '{module_name}' called sys.exit({exc.code!r}); a {noun} "
                            "module must not exit: guard its script code with if __name__ == '__main__'") from None
    except Exception as exc:  # noqa: BLE001 - the module itself fails to import
        raise BadInputError(f"importing {noun} module '{module_name}' failed: {type(exc).__name__}: "
                            f"{one_line(exc, 240)}; fix that module (rerun with --debug for the traceback)") from exc
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadInputError(f"{noun} module '{module_name}' has no attribute '{attr}'; check the name after ':' in "
                                f"'{spec}' (MODULE:CALLABLE)") from None
    if not callable(obj):
        raise BadInputError(f"{noun} '{spec}' is a {type(obj).__name__}, not a callable; name a function (or class) "
                            "in MODULE:CALLABLE")
    return obj


def call_factory(fn: Callable[..., Any], spec: str, noun: str, returns: str, **kwargs: Any) -> Any:
    """``fn(**kwargs)``; an exception or ``sys.exit`` in it is a one-line BadInputError. ``returns``
    says what a factory must return ("the torch.nn.Module")."""
    try:
        return fn(**kwargs)
    except SystemExit as exc:  # bnfold's exit code is its own, not the factory's
        raise BadInputError(f"calling {noun} '{spec}' called sys.exit({exc.code!r}); a {noun} must return "
                            f"{returns}, not exit") from None
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001
        needs = _required_parameters(fn, kwargs) if isinstance(exc, TypeError) else []
        fix = (f"; bnfold calls it with no arguments ({', '.join(needs)} required): point MODULE:CALLABLE at a "
               "function that calls it with them, e.g. def build(): return ..." if needs else "")
        raise BadInputError(
            f"calling {noun} '{spec}' failed: {type(exc).__name__}: {one_line(exc, 240)}{fix}") from exc


def _required_parameters(fn: Callable[..., Any], given: dict[str, Any]) -> list[str]:
    """The parameters of ``fn`` without a default that the call did not pass."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in given
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
