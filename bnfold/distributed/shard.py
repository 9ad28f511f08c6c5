"""Batch j of the single-process batch sequence goes to rank j mod N (files and arrays)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["RankShard", "shard_size"]


def shard_size(total: int, rank: int, world_size: int) -> int:
    """How many of ``total`` batches rank ``rank`` of ``world_size`` gets (j mod N == rank)."""
    return max(0, (total - rank + world_size - 1) // world_size)


class RankShard:
    """This rank's batches of ``data`` (a ``Batches`` or any iterable of batches): those with index
    j mod ``world_size`` == ``rank``. ``num_samples`` and ``batch_size`` stay the whole data's (what
    the report shows); ``num_batches`` is this rank's count. A rank may get none (more ranks than
    batches): it still takes part in the collectives."""

    def __init__(self, data: Any, rank: int, world_size: int) -> None:
        self._data = data
        self.rank = rank
        self.world_size = world_size
        self.batch_size = getattr(data, "batch_size", None)
        self.num_samples = getattr(data, "num_samples", None)
        total = getattr(data, "num_batches", None)
        if total is None:
            try:
                total = len(data)
            except TypeError:
                total = None
        self._total = total

    @property
    def total_batches(self) -> int | None:
        """The whole data's batch count (every rank's together), when known."""
        return self._total

    @property
    def num_batches(self) -> int | None:
        return None if self._total is None else shard_size(self._total, self.rank, self.world_size)

    def __len__(self) -> int:
        n = self.num_batches
        if n is None:
            raise TypeError("the number of batches is not known")
        return n

    def __iter__(self) -> Iterator[Any]:
        own = getattr(self._data, "batches_from", None)
        if own is not None:  # files and arrays: build only this rank's batches
            yield from own(self.rank, self.world_size)
            return
        for j, batch in enumerate(self._data):  # a stream every rank reads whole
            if j % self.world_size == self.rank:
                yield batch

    def take(self, k: int) -> Any:
        return self._data.take(k)

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped data offers (e.g. dropped)
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        return getattr(self._data, name)
