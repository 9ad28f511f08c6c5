"""The tensors of a forward's result, whatever container holds them.

Models return a tensor, tuples and lists, dicts (torchvision segmentation models: an
``OrderedDict`` with ``out`` and ``aux``), namedtuples and dataclasses, nested. torch's pytree
flattens the first ones but treats an unregistered dataclass as one leaf; ``torch.fx`` rebuilds a
dict result as a plain ``dict``. Here every container is walked the same way:

* a mapping (``dict`` and its subclasses: ``OrderedDict``, ``ModelOutput``-style classes):
  its items, in order, by key;
* a namedtuple: its fields, by name; a dataclass instance: its fields, by name;
* a tuple or list: its items, by position;
* anything else is a leaf (a tensor, or a Python value such as ``None`` or a number).

:func:`leaves` gives ``(path, leaf)`` pairs; :func:`structure` the container layout that two
results must share to be "the same output" (keys, field names and lengths; a dict and an
``OrderedDict`` with the same keys in the same order match, as do a namedtuple and a tuple).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Path", "describe", "leaves", "structure"]

#: where a leaf sits: one entry per container level, a key or field name (str) or a position (int)
Path = tuple[str | int, ...]


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_dataclass_instance(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _children(x: Any) -> list[tuple[str | int, Any]] | None:
    """The items of a container (None for a leaf)."""
    if isinstance(x, Mapping):
        return [(k if isinstance(k, (str, int)) else repr(k), v) for k, v in x.items()]
    if _is_namedtuple(x):
        return [(str(f), getattr(x, f)) for f in type(x)._fields]
    if _is_dataclass_instance(x):
        return [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
    if isinstance(x, (tuple, list)):
        return list(enumerate(x))
    return None


def leaves(out: Any) -> list[tuple[Path, Any]]:
    """Every leaf of ``out`` with its path, depth first in the containers' own order."""
    found: list[tuple[Path, Any]] = []

    def walk(x: Any, path: Path) -> None:
        items = _children(x)
        if items is None:
            found.append((path, x))
            return
        for key, child in items:
            walk(child, (*path, key))

    walk(out, ())
    return found


def _kind(x: Any) -> str:
    if isinstance(x, Mapping) or _is_dataclass_instance(x):
        return "keyed"
    return "sequence"


def structure(out: Any) -> Any:
    """A comparable description of the containers of ``out``: ``("keyed", ((key, sub), ...))`` for
    a mapping or dataclass, ``("sequence", (sub, ...))`` for a tuple, list or namedtuple, ``"leaf"``."""
    items = _children(out)
    if items is None:
        return "leaf"
    if _kind(out) == "keyed":
        return ("keyed", tuple((k, structure(v)) for k, v in items))
    return ("sequence", tuple(structure(v) for _, v in items))


def describe(out: Any) -> str:
    """The container type and its keys or length, for messages: ``OrderedDict['out', 'aux']``."""
    items = _children(out)
    name = type(out).__name__
    if items is None:
        return name
    if _kind(out) == "keyed" or _is_namedtuple(out):
        return f"{name}[{', '.join(repr(k) for k, _ in items)}]"
    return f"{name} of {len(items)}"
