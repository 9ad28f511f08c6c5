"""``NAME:1x3x640x640``: an input shape as the user writes it (standard library only).

Polygraphy's convention (``--input-shapes``, trtexec's ``--shapes``): the input's name, a colon, the
full shape (batch included). ``NAME:[1,3,640,640]`` and ``NAME:1,3,640,640`` are read too; a name may
itself hold colons (the last one separates the shape); ``NAME:[]`` is a scalar. Used by the CLI's
``--input-shape`` (a bad spec is a usage error there) and by ``bnfold.fold``/``verify``'s
``input_shapes`` (a bad one is :class:`BadInputError`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from bnfold.errors import BadInputError

__all__ = ["format_shape", "parse_input_shape", "normalize_input_shapes"]

_DIMS = re.compile(r"\d+(?:[x,]\d+)*")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x:1x3x640x640"`` -> ``("x", (1, 3, 640, 640))``; raises :class:`BadInputError` (saying the
    form to use) for anything else, a zero dim included."""
    if not isinstance(text, str):
        raise BadInputError(f"input shape {text!r} is not a 'NAME:DIMS' string: give e.g. 'x:1x3x640x640', or a "
                            "mapping {name: shape}")
    name, sep, dims = text.strip().rpartition(":")
    if not sep or not name:
        raise BadInputError(f"input shape {text!r} has no NAME: give NAME:DIMS, e.g. x:1x3x640x640")
    return name, parse_dims(dims, f"input shape {text!r}")


def parse_dims(dims: str, what: str) -> tuple[int, ...]:
    """``"1x3x640x640"`` / ``"[1,3,640,640]"`` / ``"1,3,640,640"`` -> the dims (positive ints)."""
    body = dims.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1].replace(" ", "")
        if not body:
            return ()
    if not _DIMS.fullmatch(body):
        raise BadInputError(f"{what}: {dims!r} is not a shape: give positive integers joined by 'x', "
                            "e.g. x:1x3x640x640")
    shape = tuple(int(d) for d in re.split("[x,]", body))
    if any(d < 1 for d in shape):
        raise BadInputError(f"{what}: dimensions must be at least 1, e.g. x:1x3x640x640")
    return shape


def normalize_input_shapes(given: Mapping[str, Sequence[int] | str] | Iterable[str] | None
                           ) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` as the API takes it -> ``{name: shape}``: a mapping of name to a sequence of
    ints or a ``"1x3x640x640"`` string, or ``"NAME:DIMS"`` strings. A name given twice is an error."""
    if given is None:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    if isinstance(given, Mapping):
        for name, dims in given.items():
            what = f"input_shapes[{name!r}]"
            if isinstance(dims, str):
                out[str(name)] = parse_dims(dims, what)
                continue
            try:
                shape = tuple(int(d) for d in dims)
            except (TypeError, ValueError):
                raise BadInputError(f"{what}={dims!r} is not a shape: give a tuple of positive ints, "
                                    "e.g. (1, 3, 640, 640)") from None
            if any(d < 1 for d in shape) or any(not float(d).is_integer() for d in dims):
                raise BadInputError(f"{what}={tuple(dims)!r}: dimensions must be positive integers")
            out[str(name)] = shape
        return out
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, Iterable):
        raise BadInputError(f"input_shapes must be a mapping {{name: shape}} or 'NAME:DIMS' strings, got "
                            f"{type(given).__name__}; pass e.g. input_shapes={{'x': (1, 3, 640, 640)}}")
    for text in given:
        name, shape = parse_input_shape(text)
        if name in out:
            raise BadInputError(f"input shape for {name!r} given twice; give each input once")
        out[name] = shape
    return out


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 3, 224, 224)`` -> ``"1x3x224x224"`` (``"[]"`` for a scalar)."""
    return "x".join(str(d) for d in shape) if len(shape) else "[]"
