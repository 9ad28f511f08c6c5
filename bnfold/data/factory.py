"""``--data-factory MODULE:CALLABLE``: calibration data from the user's own loader.

The callable is imported and called as ``--model-factory`` is (:mod:`bnfold.factory_import`:
the current folder on ``sys.path``, the same one-line errors, exit 3). It returns an iterable of
batches (:mod:`bnfold.data.stream`: a generator, a list, a torch ``DataLoader``; dicts of input
name -> array or tensor, or bare arrays for a one-input model), or a mapping of input name ->
array (the whole data set). Under a distributed launcher the caller passes ``rank`` and
``world_size``; they reach the callable only when its signature takes them (a parameter of that
name, or ``**kwargs``), and then the iterable it returns is taken as that rank's part; a callable
that takes neither returns the whole stream on every rank, marked :class:`SharedStream`, and
each rank keeps batch j for rank j mod N (the batches one process would make).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from bnfold.errors import BadInputError
from bnfold.factory_import import call_factory, load_callable

from .stream import SharedStream, is_stream_source

__all__ = ["accepted_keywords", "call_data_factory"]

_RETURNS = "an iterable of batches (dicts of input name -> array)"


def accepted_keywords(fn: Callable[..., Any], **candidates: Any) -> dict[str, Any]:
    """The ``candidates`` that are not None and that ``fn``'s signature accepts by keyword."""
    given = {k: v for k, v in candidates.items() if v is not None}
    if not given:
        return {}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins, C extensions: pass nothing extra
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return given
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in given.items() if k in names}


def call_data_factory(spec: str, rank: int | None = None, world_size: int | None = None) -> Any:
    """Import and call the data factory ``spec`` (``pkg.mod:callable``); its iterable of batches.

    ``rank`` / ``world_size`` are passed as keywords only when not None and the callable accepts
    them (see the module docstring). Every failure is a one-line :class:`BadInputError`."""
    fn = load_callable(spec, "data factory")
    kwargs = accepted_keywords(fn, rank=rank, world_size=world_size)
    data = call_factory(fn, spec, "data factory", _RETURNS, **kwargs)
    if not (is_stream_source(data) or isinstance(data, Mapping)):
        raise BadInputError(f"data factory '{spec}' returned a {type(data).__name__}, not {_RETURNS}; return a "
                            "generator, a list or a DataLoader of batches")
    if world_size is not None and "rank" not in kwargs and not isinstance(data, Mapping):
        return SharedStream(data)  # every rank got the whole stream: bnfold splits it j mod N
    return data
