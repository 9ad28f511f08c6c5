"""What the ranks send each other (bnfold/distributed/wire.py): it decodes to what was sent, and
bytes that are not bnfold's message decode to an error, never to code that runs (no pickle)."""
from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest

from bnfold.distributed import combine, wire
from bnfold.distributed.combine import decode_stats, encode_stats
from bnfold.distributed.run_facts import RankFacts
from bnfold.formulas.stats import update
from bnfold.records import BnStats


def _stats() -> BnStats:
    st = BnStats(channels=3)
    rng = np.random.default_rng(0)
    for n in (4, 4, 3):
        update(st, rng.standard_normal(3), rng.random(3) + 0.5, n * 7, n_b=n)
    return st


def test_stats_and_facts_round_trip_exactly() -> None:
    stats = {"bn": _stats(), "d": _stats(), "__nd__": _stats(), "a": _stats()}  # names that look like tags
    facts = RankFacts(batches=3, samples=11, first_call=["bn"], in_dtype={"bn": "float32"}, max_calls={"bn": 1},
                      ranks={"bn": [4]}, warnings=["w"])
    sent = (encode_stats(stats), facts)
    got_stats, got_facts = wire.decode(wire.encode(sent))
    assert got_facts == facts
    back = decode_stats(got_stats)
    assert list(back) == list(stats)
    for name, st in stats.items():
        for field, value in vars(st).items():
            other = getattr(back[name], field)
            if isinstance(value, np.ndarray):
                assert other.dtype == np.float64 and np.array_equal(other, value)  # bitwise: merges stay equal
            else:
                assert other == value and type(other) is type(value)


@pytest.mark.parametrize("data", [
    b"not json", b"[1]", b'{"x": 1}', b'{"a": ["f4", [1], "AAAA"]}', b'{"a": ["f8", [2], "AAAA"]}',
    b'{"f": {"d": [["evil", 1]]}}', b'{"l": [' * 5000, pickle.dumps({"ok": 1}),
])
def test_anything_else_is_a_malformed_message(data: bytes) -> None:
    with pytest.raises(wire.MalformedMessage):
        wire.decode(data)


def test_the_collectives_carry_no_pickle() -> None:
    # torch's *_object collectives unpickle what a peer sends; a rendezvous port is reachable by others
    src = inspect.getsource(combine)
    for used in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                 "send_object_list", "recv_object_list", "import pickle", "pickle.load"):
        assert used not in src, used


@pytest.mark.parametrize("change", [
    {"extra": 1}, {"sum_mu": np.zeros(2)}, {"sum_mu": np.zeros(3, dtype=np.float32)}, {"batches": -1},
    {"batches": True}, {"sum_m": np.zeros(3)}, {"sum_var": 1}, {"channels": "3"},
])
def test_statistics_a_peer_sends_are_checked_field_by_field(change: dict[str, object]) -> None:
    # before: BnStats(**fields) took anything, and the merge failed later as an internal error
    fields = dict(encode_stats({"bn": _stats()})["bn"])
    fields.update(change)
    with pytest.raises(combine.RankFailed, match="sent statistics that are not bnfold's"):
        decode_stats({"bn": fields})
    with pytest.raises(combine.RankFailed):
        decode_stats([1, 2])  # type: ignore[arg-type]
