"""The collectives of a distributed calibration: every rank's per-BN ``BnStats`` and run facts,
all-gathered once and merged in rank order; a rank's error sent to the others; rank 0's outcome shared.
They travel as bytes that decode without running anything (:mod:`bnfold.distributed.wire`: no pickle).

``BnStats`` travel generically (``dataclasses.fields``: ints as ints, arrays as float64 arrays), so
fields added to it later travel too, and combine only through :func:`bnfold.formulas.stats.merge`,
applied in rank order 0..N-1: every rank computes the same merges on the same inputs, so every rank
ends with bitwise the same statistics.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from bnfold.distributed import wire
from bnfold.distributed.group import TIMEOUT_ENV, Group
from bnfold.errors import BnfoldError, one_line
from bnfold.formulas.stats import merge
from bnfold.records import BnStats

__all__ = ["MAX_MESSAGE_BYTES", "RankFailed", "RankGuard", "decode_stats", "encode_stats", "gather_calibration",
           "gathers_done", "join_missed_gather", "merge_ranks", "share_outcome"]

T = TypeVar("T")


class RankFailed(BnfoldError):
    """Another rank failed (its one-line message and exit code), or stopped answering."""

    def __init__(self, message: str, exit_code: int = 3, *, broken: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.broken = broken  # the collective itself failed: no further collective can run


def encode_stats(stats: Mapping[str, BnStats]) -> dict[str, dict[str, Any]]:
    """Per BN, every ``BnStats`` field: ints as ints, arrays as float64 numpy arrays."""
    out: dict[str, dict[str, Any]] = {}
    for name, st in stats.items():
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(st):
            v = getattr(st, f.name)
            fields[f.name] = np.asarray(v, dtype=np.float64) if isinstance(v, np.ndarray) else v
        out[name] = fields
    return out


_STAT_FIELDS = {f.name: f for f in dataclasses.fields(BnStats)}


def _checked_stats(name: Any, fields: Any) -> BnStats:
    """One BN's ``BnStats`` from a rank's fields: exactly BnStats' fields, counts as non-negative
    ints, arrays as float64 vectors of ``channels`` values (what :func:`encode_stats` sends); else a
    one-line :class:`RankFailed` (a peer that is not bnfold, or another version of it)."""
    def bad(why: str) -> RankFailed:
        return RankFailed(f"a rank sent statistics that are not bnfold's (BN {str(name)[:80]!r}: {why}); every rank "
                          "must run the same bnfold version, and the rendezvous port must be private", broken=True)

    if not isinstance(name, str) or not isinstance(fields, Mapping) or set(fields) != set(_STAT_FIELDS):
        raise bad("unexpected fields")
    channels = fields["channels"]
    values: dict[str, Any] = {}
    if type(channels) is not int or channels < 0:
        raise bad("channels is not a count")
    for key, value in fields.items():
        if "ndarray" in str(_STAT_FIELDS[key].type):
            if not isinstance(value, np.ndarray) or value.dtype != np.float64 or value.shape != (channels,):
                raise bad(f"{key} is not {channels} float64 values")
        elif type(value) is not int or value < 0:
            raise bad(f"{key} is not a count")
        values[key] = value
    return BnStats(**values)


def decode_stats(encoded: Mapping[str, Mapping[str, Any]]) -> dict[str, BnStats]:
    if not isinstance(encoded, Mapping):
        raise RankFailed("a rank sent statistics that are not bnfold's (not a mapping of BNs); every rank must run "
                         "the same bnfold version", broken=True)
    return {name: _checked_stats(name, fields) for name, fields in encoded.items()}


def merge_ranks(per_rank: list[dict[str, BnStats]]) -> dict[str, BnStats]:
    """Merge each BN's statistics over the ranks, in rank order (a BN a rank never saw is skipped)."""
    merged: dict[str, BnStats] = {}
    for stats in per_rank:
        for name, st in stats.items():
            merged[name] = merge(merged[name], st) if name in merged else st
    return merged


#: the longest message a rank accepts from another: each rank allocates world_size times the longest
#: announced, before any byte arrives (a ResNet-50's statistics are ~0.5 MB; 1 GiB is ~10 million channels)
MAX_MESSAGE_BYTES = 1 << 30


def _gather_bytes(group: Group, payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order: the lengths, then the bytes padded to the longest
    (tensors only: nothing is pickled, see :mod:`bnfold.distributed.wire`)."""
    import torch
    import torch.distributed as dist

    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(group.world_size)]
    dist.all_gather(sizes, size, group=group.handle)
    for rank, s in enumerate(sizes):  # every rank sees the same lengths, so every rank stops here alike
        if not 0 <= int(s.item()) <= MAX_MESSAGE_BYTES:
            raise wire.MalformedMessage(f"rank {rank} announced a message of {int(s.item())} bytes (at most "
                                        f"{MAX_MESSAGE_BYTES} are accepted)")
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if payload:
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bufs = [torch.zeros(max(longest, 1), dtype=torch.uint8) for _ in range(group.world_size)]
    dist.all_gather(bufs, mine, group=group.handle)
    return [bytes(b[:int(s.item())].numpy()) for b, s in zip(bufs, sizes)]


def _all_gather(group: Group, item: Any) -> list[Any]:
    try:
        raw = _gather_bytes(group, wire.encode(item))
    except wire.MalformedMessage as exc:
        raise RankFailed(f"rank {group.rank}: {exc}; every rank must run the same bnfold version, and the "
                         "rendezvous port must be private", broken=True) from exc
    except Exception as exc:  # gloo: a peer that died closes its socket, or the timeout passes
        raise RankFailed(
            f"rank {group.rank}: another rank stopped answering during the distributed calibration "
            f"({one_line(exc, 160)}); every rank must run the same command, and each collective waits at most "
            f"{group.timeout_s:g} s ({TIMEOUT_ENV} / --dist-timeout)", broken=True) from exc
    gathered = []
    for rank, data in enumerate(raw):
        try:
            gathered.append(_envelope(wire.decode(data)))
        except wire.MalformedMessage as exc:
            raise RankFailed(f"rank {group.rank}: rank {rank} sent a message that is not bnfold's ({exc}); every "
                             "rank must run the same bnfold version, and the rendezvous port must be private",
                             broken=True) from exc
    return gathered


def _envelope(got: Any) -> dict[str, Any]:
    """``got`` when it is an item of a calibration gather: a dict, with an error as a string and an exit code 1-255."""
    if not isinstance(got, dict):
        raise wire.MalformedMessage(f"a {type(got).__name__} where a gather item belongs")
    if "error" in got and not (isinstance(got["error"], str) and type(got.get("exit_code", 3)) is int
                               and 1 <= got.get("exit_code", 3) <= 255):
        raise wire.MalformedMessage("bad error item")
    if not ({"ok", "error", "skipped"} & set(got)):
        raise wire.MalformedMessage("a gather item without a result")
    return got


#: the calibration gathers this process has taken part in (see :func:`join_missed_gather`)
_GATHERS = [0]


def gathers_done() -> int:
    """How many calibration gathers this process has taken part in so far."""
    return _GATHERS[0]


def _error_item(exc: BaseException) -> dict[str, Any]:
    """What a failed rank sends the others: its one-line message (another exception than bnfold's
    own names its class, as the rank's own report does: "KeyError: 'image'", not "'image'")."""
    if isinstance(exc, BnfoldError):
        return {"error": one_line(exc, 300), "exit_code": int(exc.exit_code)}
    if isinstance(exc, Exception):
        said = one_line(exc, 300) if str(exc).strip() else ""
        return {"error": f"{type(exc).__name__}: {said}" if said else type(exc).__name__, "exit_code": 3}
    return {"error": f"interrupted ({type(exc).__name__})", "exit_code": 3}


def _describe(key: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in key.items()) if isinstance(key, dict) else repr(key)


def gather_calibration(group: Group, work: Callable[[], T], key: Any = None) -> list[T]:
    """Run ``work`` (this rank's calibration) and all-gather its result: the list of every rank's
    result, in rank order. When any rank raised, every rank raises: the failed rank its own error,
    the others ``RankFailed("rank K failed: <its one-line message>")`` with its exit code.

    ``key`` (plain values: the model's digest, its BNs and channels, the batch size...) must be
    equal on every rank: ranks that calibrated different models or batches would otherwise merge
    statistics that do not belong together, silently; a difference is a ``RankFailed`` (exit 3)
    on every rank naming the first rank that differs from rank 0. A rank that ended before its
    gather (:func:`join_missed_gather`) makes the others fail with its error."""
    _GATHERS[0] += 1
    error: BaseException | None = None
    item: dict[str, Any]
    try:
        item = {"ok": work(), "key": key}
    except BaseException as exc:  # noqa: BLE001 - sent to the other ranks, then raised here again
        # an interrupt (Ctrl-C, SIGTERM as an exception) too: the others would wait out the timeout
        error = exc
        item = _error_item(exc)
    gathered = _all_gather(group, item)
    if error is not None:
        raise error
    for rank, got in enumerate(gathered):
        if "error" in got:
            raise RankFailed(f"rank {rank} failed: {got['error']}", got.get("exit_code", 3))
        if "skipped" in got:
            raise RankFailed(f"rank {rank} ended without calibrating while rank {group.rank} calibrated; every rank "
                             "must run the same command on the same model and data")
    for rank, got in enumerate(gathered[1:], start=1):
        if got.get("key") != gathered[0].get("key"):
            raise RankFailed(
                f"rank {rank} calibrates something else than rank 0 ({_describe(got.get('key'))} vs "
                f"{_describe(gathered[0].get('key'))}), so their statistics cannot be merged; every rank must run "
                "the same command on the same model and data")
    return [got["ok"] for got in gathered]


def join_missed_gather(group: Group, since: int, error: BaseException | None) -> BaseException | None:
    """After a rank's run: when it took part in no calibration gather since ``gathers_done() ==
    since`` (it failed before it, or had nothing to calibrate), it joins the gather the other ranks
    wait in now, with its error (they stop at once with it instead of waiting out the timeout),
    or as a rank that skipped calibration. Every rank then takes part in the same collectives.
    Returns the error the rank ends with (its own, else another rank's; None when none failed)."""
    if gathers_done() != since:
        return error
    _GATHERS[0] += 1
    try:
        gathered = _all_gather(group, _error_item(error) if error is not None else {"skipped": True})
    except RankFailed as exc:
        return error if error is not None else exc
    if error is not None:
        return error
    for rank, got in enumerate(gathered):
        if "error" in got:
            return RankFailed(f"rank {rank} failed: {got['error']}", got.get("exit_code", 3))
        if "skipped" not in got:  # it calibrated: this rank's command differs from its
            return RankFailed(f"rank {rank} calibrated while rank {group.rank} ended without calibrating; every rank "
                              "must run the same command on the same model and data")
    return None


def share_outcome(group: Group, exit_code: int, message: str | None) -> tuple[int, str | None]:
    """Rank 0's exit code and error message, on every rank (the others pass theirs, unused)."""
    try:
        raw = _gather_bytes(group, wire.encode([exit_code, message]))
    except Exception as exc:
        who = "rank 0" if group.rank != 0 else "another rank"  # rank 0 waits for the others here
        raise RankFailed(f"rank {group.rank}: {who} stopped answering before it finished "
                         f"({one_line(exc, 160)}; timeout {group.timeout_s:g} s, {TIMEOUT_ENV} / --dist-timeout)",
                         broken=True) from exc
    try:
        code, msg = wire.decode(raw[0])
        if type(code) is not int or not 0 <= code <= 255:
            raise ValueError(f"exit code {code!r}")
        return code, (None if msg is None else str(msg))
    except (wire.MalformedMessage, TypeError, ValueError) as exc:
        raise RankFailed(f"rank {group.rank}: rank 0 sent an outcome that is not bnfold's ({exc})",
                         broken=True) from exc


class RankGuard:
    """One rank's side of a calibration pass with a single gather: :meth:`gather` sends this rank's
    result; :meth:`fail` sends an error raised before the gather (so the others stop), and does
    nothing after it (the ranks then hold the same merged statistics and fail alike)."""

    def __init__(self, group: Group, key: Any = None) -> None:
        self.group = group
        self.key = key  # what every rank must agree on (see gather_calibration)
        self.gathered = False

    def gather(self, item: T) -> list[T]:
        self.gathered = True
        return gather_calibration(self.group, lambda: item, key=self.key)

    def fail(self, exc: BaseException) -> None:
        """Send ``exc`` to the other ranks (when the gather has not run yet); raises ``exc``."""
        if not self.gathered:
            self.gathered = True

            def work() -> None:
                raise exc

            gather_calibration(self.group, work)
        raise exc
