"""Calibration data from any iterable of batches (a generator, a list, a torch ``DataLoader``).

Each item the source yields is one batch:

* a mapping ``{input_name: array}`` (numpy arrays or torch tensors, leading axis = samples);
* a bare array or tensor, for a model with one input (as a ``.npy`` file is);
* a tuple or list of arrays, given to the model inputs in order (a ``DataLoader`` over a
  ``TensorDataset`` yields ``[x]``).

A bare array or tensor passed as the source itself is one batch. The number of samples is not
known up front: ``num_batches`` is None until a pass has ended. Every batch is checked as files are
(:mod:`bnfold.data.sources`): names, rank, static dims, the dtype rule, values that fit, NaN/Inf;
each message names the batch (counted from 1, in the order the source yields them) and its sample
range. ``batch_size`` re-chunks the stream into batches of that many samples (the last may be
short); None keeps the source's batches as given. With a model that fixes its batch size the
stream is re-chunked to it and a short last batch is dropped (``dropped``).

A second pass: a source that ``iter()`` returns afresh (a list, a ``DataLoader``) is read again; a
one-shot iterator (a generator) is read once, and a second pass is a one-line error. What
verification needs after calibration, the first samples (``take``), is kept while streaming: the
first ``keep`` samples are held in memory during the first pass, so a generator is never re-read.

torch is never imported here: a tensor is recognised by its type's module and converted with its
own methods.
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.errors import BadInputError, one_line
from bnfold.records import InputSpec

from .sources import _MEMORY, _check_dtype_storable, _fmt_shape, _Member, _validate_file, cast_checked

__all__ = ["SharedStream", "StreamData", "StreamSource", "array_dtype", "is_stream_source",
           "refuse_read_generator"]


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or _is_tensor(obj)


def is_stream_source(data: Any) -> bool:
    """True for data the stream reads: a bare array or tensor, or an iterable that is not a path,
    a mapping of arrays (the whole data set) or opened data."""
    if _is_array(data):
        return True
    if isinstance(data, (str, bytes, Mapping)) or hasattr(data, "__fspath__") or hasattr(data, "take"):
        return False
    return isinstance(data, Iterable)


def array_dtype(value: Any) -> np.dtype | None:
    """The numpy dtype of an array or tensor (None for anything else); a tensor's values are not
    copied (a GPU batch stays where it is; a 'meta' tensor has none)."""
    if _is_tensor(value):
        return _to_numpy(value.new_empty((0,), device="cpu")).dtype
    return _to_numpy(value).dtype if _is_array(value) else None


def _to_numpy(value: Any) -> np.ndarray:
    if _is_tensor(value):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(value)


def refuse_read_generator(source: Any) -> None:
    """Refuse a generator whose next item is not its first (read in part or in full, e.g. by an
    earlier call that stopped on a bad batch): what is left would calibrate silently on part of the data."""
    if isinstance(source, types.GeneratorType) and inspect.getgeneratorstate(source) != inspect.GEN_CREATED:
        raise BadInputError(
            "calibration data source is a generator that was already read (in part or in full, e.g. by an "
            "earlier call that stopped with an error); pass a new generator for each call, or a list or a "
            "DataLoader (to skip its first items on purpose, pass itertools.islice(gen, k, None))")


class SharedStream:
    """An iterable of batches that every rank of a distributed run reads whole: a ``--data-factory``
    whose callable takes no ``rank``. Marked so that each rank keeps batch j for rank j mod N (as for
    files), where any other iterable is taken as the rank's own part (``DistributedSampler`` style).
    One process reads it as the iterable itself."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Any]:
        return iter(self.source)


class StreamSource:
    """An iterable of batches with its first item read ahead (to learn which inputs it supplies).

    ``supplied_names``: the input names a mapping batch holds (None for arrays: every input).
    ``shared``: the source was a :class:`SharedStream` (every rank reads all of it)."""

    def __init__(self, source: Any) -> None:
        self.shared = isinstance(source, SharedStream)
        if isinstance(source, SharedStream):
            source = source.source
        refuse_read_generator(source)
        self.source = source
        self.single = _is_array(source)  # the source itself is one batch
        self._passes = 0
        self._peeked: list[Any] = []
        it = self._fresh()
        self.reiterable = self.single or it is not source  # a generator is its own iterator
        self._first: Iterator[Any] | None = it
        head = self._next(it, 1)
        self._peeked = [] if head is _END else [head]
        self.head = head  # the first item, as the source gave it
        if head is _END:
            raise BadInputError("calibration data source yielded no batches; give an iterable that yields at least "
                                "one batch of samples")
        self.supplied_names: frozenset[str] | None = (
            frozenset(str(k) for k in head) if isinstance(head, Mapping) else None)

    def _fresh(self) -> Iterator[Any]:
        if self.single:
            return iter([self.source])
        try:
            return iter(self.source)
        except Exception as exc:  # noqa: BLE001 - the user's __iter__
            raise BadInputError(f"calibration data source raised {type(exc).__name__} when iterated: "
                                f"{one_line(exc, 240)}; fix the data source") from exc

    @staticmethod
    def _next(it: Iterator[Any], number: int) -> Any:
        try:
            return next(it)
        except StopIteration:
            return _END
        except BadInputError:
            raise
        except SystemExit as exc:  # bnfold's exit code is its own, not the source's (as for the factories)
            raise BadInputError(f"calibration data source called sys.exit({exc.code!r}) on batch {number}; a data "
                                "source must yield batches and end by returning, not exit") from None
        except Exception as exc:  # noqa: BLE001 - the user's iterable fails: name it, one line
            raise BadInputError(f"calibration data source raised {type(exc).__name__} on batch {number}: "
                                f"{one_line(exc, 240)}; fix the data source") from exc

    def items(self) -> Iterator[Any]:
        """The source's items, once per call; a one-shot source only once."""
        self._passes += 1
        if self._passes == 1:
            assert self._first is not None
            it, pending = self._first, self._peeked
            self._first, self._peeked = None, []
        elif not self.reiterable:
            raise BadInputError(
                "calibration data source is a one-shot iterator (e.g. a generator) and was already read; pass a "
                "list or a DataLoader (read again on each pass), or a new generator for each call")
        else:
            it, pending = self._fresh(), []
        number = 0
        for item in pending:
            number += 1
            yield item
        while True:
            number += 1
            item = self._next(it, number)
            if item is _END:
                return
            yield item


_END = object()


class StreamData:
    """:class:`StreamSource` batches checked against ``inputs`` and re-chunked (the ``Batches``
    protocol of :mod:`bnfold.data.sources`, with ``num_batches`` None until a pass has ended)."""

    def __init__(self, source: StreamSource, inputs: Sequence[InputSpec], batch_size: int | None, *,
                 fixed: int | None = None, keep: int = 0, model_inputs: Sequence[str] = ()) -> None:
        self._source = source
        self._inputs = list(inputs)
        self._model_inputs = list(model_inputs)  # every input of the model (``inputs``: those the stream supplies)
        self._requested = batch_size
        self._fixed = fixed
        self.source = "(stream)"
        self.num_samples = 0  # seen so far; the total once a pass has ended
        self.num_batches: int | None = None
        self.dropped = 0
        self._batch_size: int | None = fixed if fixed is not None else batch_size
        self._keep = keep
        self._kept: list[dict[str, np.ndarray]] = []
        self._kept_n = 0
        self._sample_shapes: dict[str, tuple[int, ...]] = {}
        self._live: Iterator[dict[str, np.ndarray]] | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._started = False
        self._ended = False

    # -- protocol ----------------------------------------------------------------------------

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        return tuple(self._inputs)

    @property
    def reiterable(self) -> bool:
        """Whether a second pass reads the source again (a list, a DataLoader; not a generator)."""
        return self._source.reiterable

    @property
    def shared(self) -> bool:
        """Whether every rank of a distributed run reads all of it (:class:`SharedStream`): then
        batch j is rank j mod N's, as for files; else the stream is this rank's own part."""
        return self._source.shared

    @property
    def batch_size(self) -> int:
        """The batch size asked for, else the first batch's size (0 before any batch is read)."""
        return self._batch_size or 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if not self._started:
            self._started = True
            while self._pending:
                yield self._pending.pop(0)
            while True:
                batch = self._pull()
                if batch is None:
                    return
                yield batch
        else:  # a second pass: a re-iterable source read again (counts as first read them)
            yield from self._batches(self._source.items())

    def take(self, k: int) -> dict[str, np.ndarray]:
        """The first ``min(k, samples)`` samples as one batch (for verification): the samples kept
        while streaming, read ahead before the first pass, or read again from a re-iterable source."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadInputError(f"number of samples to take must be at least 1, got {k!r}; ask for 1 or more samples")
        k = int(k)
        if not self._started:  # read ahead; the first pass yields these batches first
            self._keep = max(self._keep, k)
            while self._kept_n < k:
                batch = self._pull()
                if batch is None:
                    break
                self._pending.append(batch)
        if self._kept_n >= k or (self._ended and self._kept_n >= self.num_samples):
            return _concat(self._kept, k)
        if self._source.reiterable:
            return _concat(_first_samples(self._batches(self._source.items()), k), k)
        raise BadInputError(
            f"verification needs the first {k} calibration samples, but the one-shot data source (e.g. a "
            f"generator) was read and only {self._kept_n} were kept; pass a list or a DataLoader")

    def __repr__(self) -> str:
        return f"StreamData(samples={self.num_samples}, batches={self.num_batches}, batch_size={self.batch_size})"

    # -- internals ---------------------------------------------------------------------------

    def _pull(self) -> dict[str, np.ndarray] | None:
        if self._live is None:
            self._live = self._batches(self._source.items(), first=True)
        batch = next(self._live, None)
        if batch is None:
            self._ended = True
            return None
        if self._kept_n < self._keep:
            self._kept.append(batch)
            self._kept_n += _count(batch)
        return batch

    def _batches(self, items: Iterator[Any], first: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Checked, re-chunked batches; on the first pass also the counts."""
        size = self._fixed if self._fixed is not None else self._requested
        held: list[dict[str, np.ndarray]] = []
        held_n = samples = batches = 0
        start = 0
        for number, item in enumerate(items, start=1):
            batch = self._check(item, number, start)
            n = _count(batch)
            start += n
            if size is None:
                samples, batches = samples + n, batches + 1
                if first:
                    self._note(samples, batches, n)
                yield batch
                continue
            held.append(batch)
            held_n += n
            while held_n >= size:
                out, held, held_n = _split(held, size)
                samples, batches = samples + size, batches + 1
                if first:
                    self._note(samples, batches, size)
                yield out
        if start == 0:
            raise BadInputError("calibration data source yielded no samples; give at least one sample per input")
        if held_n and self._fixed is not None:
            if samples == 0:
                raise BadInputError(
                    f"{held_n} calibration samples, fewer than the model's fixed batch size {self._fixed}; "
                    f"give at least {self._fixed} samples")
            if first:
                self.dropped = held_n
        elif held_n:
            out = _concat(held, held_n)
            samples, batches = samples + held_n, batches + 1
            if first:
                self._note(samples, batches, held_n)
            yield out
        if first:
            self.num_samples, self.num_batches = samples, batches

    def _note(self, samples: int, batches: int, size: int) -> None:
        self.num_samples = samples
        if self._batch_size is None:
            self._batch_size = size

    def _check(self, item: Any, number: int, start: int) -> dict[str, np.ndarray]:
        """One source item as ``{input: array}`` in the inputs' dtypes, checked as files are."""
        arrays = self._as_arrays(item, number)
        label = f"batch {number}"
        own = {spec.name for spec in self._inputs}
        late = [k for k in arrays if k not in own and k in self._model_inputs]
        if late:  # a model input the first batch did not supply (it is generated where the data lacks it)
            raise BadInputError(
                f"calibration data batch {number} holds model input '{late[0]}', which batch 1 did not; every batch "
                "must supply the same inputs")
        members = []
        for key, value in arrays.items():
            _check_dtype_storable(label, key, value.dtype)
            members.append(_Member(key=key, dtype=value.dtype, shape=value.shape, fortran=False, kind=_MEMORY,
                                   array=value))
        checked = _validate_file(label, members, self._inputs)
        n = checked.samples
        if n == 0:
            raise BadInputError(f"calibration data batch {number} has zero samples; yield batches of at least one "
                                "sample")
        where = f"in batch {number} (samples {start}..{start + n - 1} of the stream)"
        out: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            arr = arrays[spec.name]
            shape = tuple(arr.shape[1:])
            seen = self._sample_shapes.setdefault(spec.name, shape)
            if seen != shape:
                raise BadInputError(
                    f"calibration data batch {number} input '{spec.name}' has per-sample shape {_fmt_shape(shape)} "
                    f"but earlier batches have {_fmt_shape(seen)}; every batch must hold samples of the same shape")
            out[spec.name] = cast_checked(spec, arr, where, "give")
        return out

    def _as_arrays(self, item: Any, number: int) -> dict[str, np.ndarray]:
        names = [s.name for s in self._inputs]
        if isinstance(item, Mapping):
            bad = [k for k in item if not isinstance(k, str)]
            if bad:
                raise BadInputError(f"calibration data batch {number} has non-string key(s) {bad[:3]!r}; key each "
                                    "array by its model input name")
            return {k: self._array(v, number, k) for k, v in item.items()}
        if _is_array(item):
            if len(names) != 1:
                raise BadInputError(
                    f"calibration data batch {number} is a bare array, but the model has {len(names)} inputs "
                    f"({', '.join(repr(n) for n in names)}); yield dicts of input name -> array")
            return {names[0]: self._array(item, number, names[0])}
        if isinstance(item, (tuple, list)) and item and all(_is_array(v) for v in item):
            if len(item) != len(names):
                raise BadInputError(
                    f"calibration data batch {number} holds {len(item)} arrays but the model has {len(names)} "
                    f"inputs ({', '.join(repr(n) for n in names)}); yield one array per input, or dicts of input "
                    "name -> array")
            return {name: self._array(v, number, name) for name, v in zip(names, item)}
        raise BadInputError(
            f"calibration data batch {number} is a {type(item).__name__}; yield dicts of input name -> array (numpy "
            "or torch), or bare arrays for a one-input model")

    @staticmethod
    def _array(value: Any, number: int, key: str) -> np.ndarray:
        if not _is_array(value):
            raise BadInputError(f"calibration data batch {number} input '{key}' is a {type(value).__name__}, not an "
                                "array; give numpy arrays or torch tensors")
        if _is_tensor(value) and getattr(value, "is_meta", False):
            raise BadInputError(f"calibration data batch {number} input '{key}' is a tensor on the 'meta' device, "
                                "which holds no values; give tensors with data (on the CPU or a GPU)")
        return _to_numpy(value)


def _count(batch: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _split(held: list[dict[str, np.ndarray]], size: int
           ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], int]:
    """The first ``size`` held samples as one batch, and what is left."""
    whole = _concat(held, sum(_count(b) for b in held))
    out = {k: v[:size] for k, v in whole.items()}
    rest = {k: v[size:] for k, v in whole.items()}
    left = _count(rest)
    return out, ([rest] if left else []), left


def _concat(batches: list[dict[str, np.ndarray]], k: int) -> dict[str, np.ndarray]:
    keys = list(batches[0])
    if len(batches) == 1:
        return {name: np.ascontiguousarray(batches[0][name][:k]) for name in keys}
    return {name: np.ascontiguousarray(np.concatenate([b[name] for b in batches], axis=0)[:k]) for name in keys}


def _first_samples(batches: Iterator[dict[str, np.ndarray]], k: int) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = []
    n = 0
    for batch in batches:
        out.append(batch)
        n += _count(batch)
        if n >= k:
            break
    return out
