"""review17b: bytes from a peer that decode to something bnfold never sends are a MalformedMessage
(one line, RankFailed), never another exception type (an internal error with a traceback)."""
from __future__ import annotations

import json

import pytest

from bnfold.distributed import wire
from bnfold.distributed.run_facts import RankFacts


@pytest.mark.parametrize("body", [
    {"a": ["f8", [10**30], ""]},  # was OverflowError: Python int too large to convert to C long
    {"a": ["i8", [2**63], ""]},
    {"l": [{"a": ["f8", [1, 10**19], ""]}]},
])
def test_an_array_shape_too_large_for_int64_is_malformed(body: object) -> None:
    with pytest.raises(wire.MalformedMessage):
        wire.decode(json.dumps(body).encode())


@pytest.mark.parametrize("fields", [
    [["batches", "x"]],  # was accepted: combine_facts then failed summing 'x' (internal error)
    [["samples", 1.5]],
    [["warnings", 5]],
    [["first_call", {"l": [1]}]],
    [["in_dtype", {"d": [["bn", 3]]}]],
    [["max_calls", {"d": [["bn", "many"]]}]],
    [["ranks", {"d": [["bn", {"l": ["4"]}]]}]],
    [["batches", True]],
])
def test_run_facts_of_the_wrong_types_are_malformed(fields: list[list[object]]) -> None:
    with pytest.raises(wire.MalformedMessage):
        wire.decode(json.dumps({"f": {"d": fields}}).encode())


def test_run_facts_of_the_right_types_still_round_trip() -> None:
    facts = RankFacts(batches=3, samples=None, first_call=["a\x00\"'é"], in_dtype={"a": "float32"},
                      max_calls={"a": 2}, ranks={"a": [4]}, warnings=["w"])
    assert wire.decode(wire.encode(facts)) == facts
