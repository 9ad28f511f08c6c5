"""What the ranks send each other, as bytes that decode without running anything: JSON, with
numpy arrays as (dtype, shape, base64 bytes) and the run facts as a plain object.

``torch.distributed``'s ``*_object`` collectives pickle, and unpickling bytes from a peer runs any
code the peer chose; a calibration's rendezvous port is reachable by whoever can reach the host,
and bnfold runs as root in CI (docs/security.md: no pickle of bytes bnfold did not write). So the
collectives here carry tensors of bytes: the lengths first (one int64 per rank), then the payloads
padded to the longest. Decoding accepts only float64/int64 arrays whose byte count matches their
shape, and :class:`RankFacts` with its own fields; anything else is a malformed message.
"""
from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from bnfold.distributed.run_facts import RankFacts

__all__ = ["MalformedMessage", "decode", "encode"]

_DTYPES = {"f8": np.dtype("<f8"), "i8": np.dtype("<i8")}


class MalformedMessage(ValueError):
    """Bytes from a peer that are not a message bnfold sends."""


def _pack(obj: Any) -> Any:
    """``obj`` as JSON values, every container tagged (so no user key, such as a BN named
    ``"a"``, can be taken for a tag): ``{"d": [[key, value], ...]}``, ``{"l": [...]}``,
    ``{"a": [dtype, shape, base64]}``, ``{"f": {...}}`` (RankFacts); str, int, float, bool, None as they are."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, dict):
        return {"d": [[str(k), _pack(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l": [_pack(v) for v in obj]}
    if isinstance(obj, np.ndarray):
        kind = "i8" if obj.dtype.kind in "iub" else "f8"
        arr = np.ascontiguousarray(obj, dtype=_DTYPES[kind])
        return {"a": [kind, list(arr.shape), base64.b64encode(arr.tobytes()).decode("ascii")]}
    if isinstance(obj, RankFacts):
        return {"f": _pack(dataclasses.asdict(obj))}
    raise TypeError(f"cannot send a {type(obj).__name__} to the other ranks")


def encode(obj: Any) -> bytes:
    """``obj`` (dicts with str keys, lists, tuples (as lists), str, int, float, None, numpy arrays,
    RankFacts) as bytes."""
    return json.dumps(_pack(obj), allow_nan=True, separators=(",", ":")).encode("utf-8")


def _array(kind: Any, shape: Any, data: Any) -> np.ndarray:
    dtype = _DTYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) \
            or not isinstance(data, str):
        raise MalformedMessage("bad array header")
    raw = base64.b64decode(data, validate=True)
    if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise MalformedMessage("array bytes do not match its shape")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_dict(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


#: each RankFacts field's type, checked on arrival (a wrong type would fail later, deep in the merge)
_FACT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "batches": _is_int, "samples": lambda v: v is None or _is_int(v), "first_call": _str_list,
    "in_dtype": _str_dict(lambda x: isinstance(x, str)), "max_calls": _str_dict(_is_int),
    "ranks": _str_dict(lambda x: isinstance(x, list) and all(_is_int(n) for n in x)), "warnings": _str_list,
}
assert set(_FACT_CHECKS) == {f.name for f in dataclasses.fields(RankFacts)}


def _unpack(v: Any, depth: int = 0) -> Any:
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if depth > 16 or not isinstance(v, dict) or len(v) != 1:
        raise MalformedMessage("unexpected value")
    tag, body = next(iter(v.items()))
    if tag == "d" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                     for p in body):
        return {k: _unpack(x, depth + 1) for k, x in body}
    if tag == "l" and isinstance(body, list):
        return [_unpack(x, depth + 1) for x in body]
    if tag == "a" and isinstance(body, list) and len(body) == 3:
        return _array(*body)
    if tag == "f":
        fields = _unpack(body, depth + 1)
        if not isinstance(fields, dict) or set(fields) - set(_FACT_CHECKS) \
                or not all(_FACT_CHECKS[k](v) for k, v in fields.items()):
            raise MalformedMessage("bad run facts")
        return RankFacts(**fields)
    raise MalformedMessage(f"unknown tag {tag!r}")


def decode(data: bytes) -> Any:
    """The object :func:`encode` made (tuples come back as lists); :class:`MalformedMessage` for
    anything else."""
    try:
        return _unpack(json.loads(data.decode("utf-8")))
    except MalformedMessage:
        raise
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError) as exc:
        # bad JSON or base64, wrong field types, an array shape beyond int64
        raise MalformedMessage(str(exc)) from exc
