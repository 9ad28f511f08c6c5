"""Calibration data sources: formats, batching, memory mapping and every validation error."""
from __future__ import annotations

import os
import tracemalloc
import zipfile

import numpy as np
import pytest

from bnfold.data.sources import CalibrationData, _is_mapped, from_arrays, open_data
from bnfold.errors import BadInputError
from bnfold.records import InputSpec

X_SPEC = InputSpec("x", np.float32, (None, 3, 4, 4))
M_SPEC = InputSpec("m", np.float32, ("batch", 5))


def _x(n: int, start: int = 0) -> np.ndarray:
    """Samples whose value encodes their index, so order is checkable."""
    base = np.arange(start, start + n, dtype=np.float32)[:, None, None, None]
    return np.broadcast_to(base, (n, 3, 4, 4)).copy() + np.linspace(0, 0.5, 48, dtype=np.float32).reshape(1, 3, 4, 4)


def _m(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n, dtype=np.float32)[:, None] * 10 + np.arange(5, dtype=np.float32)).copy()


def _bad(fn, *words: str) -> str:
    with pytest.raises(BadInputError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def _collect(data: CalibrationData) -> list[dict[str, np.ndarray]]:
    batches = list(data)
    for b in batches:
        for name, arr in b.items():
            spec = {s.name: s for s in data.inputs}[name]
            assert arr.dtype == spec.dtype
            assert arr.flags.c_contiguous
            assert not _is_mapped(arr)  # a copy: the batch outlives the map
    return batches


# ---------------------------------------------------------------- round trips


def test_npz_round_trip_batches_in_order_short_last(tmp_path):
    x, m = _x(10), _m(10)
    p = tmp_path / "calib.npz"
    np.savez(p, x=x, m=m)
    data = open_data(p, [X_SPEC, M_SPEC], batch_size=4)
    assert (data.num_samples, data.batch_size, data.num_batches, len(data)) == (10, 4, 3, 3)
    batches = _collect(data)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"x", "m"}
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["m"] for b in batches]), m)
    np.testing.assert_array_equal(batches[1]["x"], x[4:8])
    # iterating again gives the same batches
    again = list(data)
    for b1, b2 in zip(batches, again):
        np.testing.assert_array_equal(b1["x"], b2["x"])


def test_npy_round_trip_and_one_batch_when_batch_size_none(tmp_path):
    x = _x(7)
    p = tmp_path / "x.npy"
    np.save(p, x)
    data = open_data(str(p), [X_SPEC], batch_size=None)
    assert (data.num_samples, data.batch_size, data.num_batches) == (7, 7, 1)
    (only,) = _collect(data)
    np.testing.assert_array_equal(only["x"], x)
    data3 = open_data(p, [X_SPEC], batch_size=3)
    assert [b["x"].shape[0] for b in _collect(data3)] == [3, 3, 1]


def test_fortran_order_npy(tmp_path):
    x = np.asfortranarray(_x(5))
    p = tmp_path / "f.npy"
    np.save(p, x)
    batches = _collect(open_data(p, [X_SPEC], 2))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_directory_sorted_and_batch_spans_two_files(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    # written out of order: read back by sorted file name
    np.savez(d / "part-01.npz", x=_x(5, start=7), m=_m(5, start=7))
    np.savez_compressed(d / "part-00.npz", x=_x(7), m=_m(7))
    (d / "README.txt").write_text("not data")
    data = open_data(d, [X_SPEC, M_SPEC], batch_size=4)
    assert (data.num_samples, data.num_batches) == (12, 3)
    batches = _collect(data)
    # batch 1 = samples 4..7: 4..6 from part-00, 7 from part-01
    np.testing.assert_array_equal(batches[1]["x"], _x(4, start=4))
    np.testing.assert_array_equal(batches[1]["m"], _m(4, start=4))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), _x(12))
    np.testing.assert_array_equal(np.concatenate([b["m"] for b in batches]), _m(12))


def test_directory_of_npy_files_and_take_across_files(tmp_path):
    d = tmp_path / "npys"
    d.mkdir()
    np.save(d / "a.npy", _x(3))
    np.save(d / "b.npy", _x(0, start=3))  # empty shard: contributes nothing
    np.save(d / "c.npy", _x(4, start=3))
    data = open_data(d, [X_SPEC], batch_size=2)
    assert data.num_samples == 7
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in _collect(data)]), _x(7))
    t = data.take(5)
    assert t["x"].dtype == np.float32 and t["x"].flags.c_contiguous
    np.testing.assert_array_equal(t["x"], _x(5))
    np.testing.assert_array_equal(data.take(100)["x"], _x(7))  # clipped to what exists
    _bad(lambda: data.take(0), "at least 1")


def test_compressed_npz_works(tmp_path):
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=_x(9), m=_m(9))
    data = open_data(p, [X_SPEC, M_SPEC], batch_size=4)
    assert not any(_is_mapped(a) for a in data._open_file(0).values())
    batches = _collect(data)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), _x(9))
    np.testing.assert_array_equal(np.concatenate([b["m"] for b in batches]), _m(9))


def test_from_arrays_round_trip():
    x, m = _x(6).astype(np.float64), _m(6)
    data = from_arrays({"x": x, "m": m}, [X_SPEC, M_SPEC], 4)
    batches = _collect(data)
    assert [b["x"].shape[0] for b in batches] == [4, 2]
    np.testing.assert_allclose(np.concatenate([b["x"] for b in batches]), x)


def test_input_spec_normalises():
    s = InputSpec("x", "float16", ("N", 3, -1, 8))
    assert s.dtype == np.dtype(np.float16)
    assert s.shape == (None, 3, None, 8)


# ---------------------------------------------------------------- memory mapping


def test_npy_and_uncompressed_npz_are_mapped(tmp_path):
    np.save(tmp_path / "x.npy", _x(4))
    np.savez(tmp_path / "xm.npz", x=_x(4), m=_m(4))
    d1 = open_data(tmp_path / "x.npy", [X_SPEC], 2)
    d2 = open_data(tmp_path / "xm.npz", [X_SPEC, M_SPEC], 2)
    assert _is_mapped(d1._open_file(0)["x"])
    raw = d2._open_file(0)
    assert _is_mapped(raw["x"]) and _is_mapped(raw["m"])
    np.testing.assert_array_equal(raw["x"], _x(4))  # the mapped offset is right
    np.testing.assert_array_equal(raw["m"], _m(4))
    assert not _is_mapped(np.zeros(3)) and _is_mapped(np.memmap(tmp_path / "x.npy", mode="r")[10:])


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_streaming_big_file_uses_little_memory(tmp_path, fmt):
    n, feat = 3000, 4096  # 48 MB of float32
    spec = InputSpec("x", np.float32, (None, feat))
    big = np.ones((n, feat), dtype=np.float32)
    big[-1, 0] = 7.0
    p = tmp_path / f"big.{fmt}"
    np.save(p, big) if fmt == "npy" else np.savez(p, x=big)
    del big
    data = open_data(p, [spec], batch_size=100)  # 1.6 MB per batch
    tracemalloc.start()
    try:
        last = None
        count = 0
        for batch in data:
            count += batch["x"].shape[0]
            last = batch["x"][-1, 0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and last == 7.0
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB: the file was loaded, not mapped"


# ---------------------------------------------------------------- dtypes


def test_float64_data_is_cast_to_float32_input(tmp_path):
    np.savez(tmp_path / "d.npz", x=_x(3).astype(np.float64))
    (b,) = list(open_data(tmp_path / "d.npz", [X_SPEC], None))
    assert b["x"].dtype == np.float32
    np.testing.assert_array_equal(b["x"], _x(3))
    f16 = InputSpec("x", np.float16, (None, 3, 4, 4))
    (b,) = list(open_data(tmp_path / "d.npz", [f16], None))
    assert b["x"].dtype == np.float16


def test_integer_data_for_float_input_is_an_error(tmp_path):
    np.savez(tmp_path / "i.npz", x=np.zeros((2, 3, 4, 4), dtype=np.int64))
    _bad(lambda: open_data(tmp_path / "i.npz", [X_SPEC], 1), "int64", "float32", "'x'")
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 4, 4), dtype=bool))
    _bad(lambda: open_data(tmp_path / "b.npz", [X_SPEC], 1), "bool", "float32")


def test_float_data_for_int_input_is_an_error_and_ints_cast():
    ids = InputSpec("ids", np.int64, (None, 4))
    _bad(lambda: from_arrays({"ids": np.zeros((2, 4), np.float32)}, [ids], 1), "float32", "int64")
    (b,) = list(from_arrays({"ids": np.arange(8, dtype=np.int32).reshape(2, 4)}, [ids], None))
    assert b["ids"].dtype == np.int64
    small = InputSpec("ids", np.int8, (None, 4))
    data = from_arrays({"ids": np.array([[1, 2, 3, 4], [1, 2, 3, 1000]], dtype=np.int64)}, [small], 1)
    it = iter(data)
    assert next(it)["ids"].dtype == np.int8
    _bad(lambda: next(it), "int8", "1000", "samples 1..1")


def test_overflow_on_cast_is_reported(tmp_path):
    x = _x(2).astype(np.float64)
    x[1, 0, 0, 0] = 1e6  # beyond float16
    f16 = InputSpec("x", np.float16, (None, 3, 4, 4))
    data = from_arrays({"x": x}, [f16], 1)
    it = iter(data)
    next(it)
    _bad(lambda: next(it), "overflows", "float16")


# ---------------------------------------------------------------- validation errors


def test_path_problems(tmp_path):
    _bad(lambda: open_data(tmp_path / "nope.npz", [X_SPEC], 1), "nope.npz", "does not exist")
    (tmp_path / "data.txt").write_text("1 2 3")
    _bad(lambda: open_data(tmp_path / "data.txt", [X_SPEC], 1), "data.txt", ".npz", ".npy")
    (tmp_path / "empty").mkdir()
    _bad(lambda: open_data(tmp_path / "empty", [X_SPEC], 1), "empty", "no .npz or .npy")


def test_corrupted_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all")
    _bad(lambda: open_data(tmp_path / "junk.npz", [X_SPEC], 1), "junk.npz", "not a valid .npz")
    (tmp_path / "junk.npy").write_bytes(b"garbage garbage garbage")
    _bad(lambda: open_data(tmp_path / "junk.npy", [X_SPEC], 1), "junk.npy", "not a valid .npy")
    np.save(tmp_path / "short.npy", _x(4))
    raw = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(raw[: len(raw) - 100])
    _bad(lambda: open_data(tmp_path / "short.npy", [X_SPEC], 1), "short.npy", "truncated")
    # a zip whose member is not an .npy
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as zf:
        zf.writestr("x.npy", b"not an npy header")
    _bad(lambda: open_data(tmp_path / "odd.npz", [X_SPEC], 1), "odd.npz", "not a valid .npz")
    # corrupted compressed payload (header intact) is caught when the file is read
    np.savez_compressed(tmp_path / "cz.npz", x=np.random.default_rng(0).normal(size=(50, 3, 4, 4)).astype(np.float32))
    raw = bytearray((tmp_path / "cz.npz").read_bytes())
    for i in range(5000, 5200):  # well past the member's .npy header
        raw[i] ^= 0x5A
    (tmp_path / "cz.npz").write_bytes(bytes(raw))
    data = open_data(tmp_path / "cz.npz", [X_SPEC], 10)  # headers are intact
    _bad(lambda: list(data), "cz.npz", "corrupted")


def test_object_array_is_an_error(tmp_path):
    arr = np.empty((2, 3, 4, 4), dtype=object)
    arr[...] = 1.0
    np.savez(tmp_path / "o.npz", x=arr)
    _bad(lambda: open_data(tmp_path / "o.npz", [X_SPEC], 1), "object")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    p = tmp_path / "locked.npz"
    np.savez(p, x=_x(2))
    p.chmod(0)
    try:
        _bad(lambda: open_data(p, [X_SPEC], 1), "locked.npz", "permission")
    finally:
        p.chmod(0o644)


def test_missing_input_lists_what_was_found(tmp_path):
    np.savez(tmp_path / "x.npz", input=_x(2), mask=_m(2))
    images = InputSpec("images", np.float32, (None, 3, 4, 4))
    _bad(
        lambda: open_data(tmp_path / "x.npz", [images], 1),
        "x.npz",
        "no array for model input 'images'",
        "found: 'input', 'mask'",
        "name each array after a model input",
    )


def test_extra_array_names_the_model_inputs(tmp_path):
    np.savez(tmp_path / "e.npz", x=_x(2), extra=_m(2))
    _bad(lambda: open_data(tmp_path / "e.npz", [X_SPEC], 1), "'extra'", "model has: 'x'")


def test_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "x.npy", _x(2))
    _bad(lambda: open_data(tmp_path / "x.npy", [X_SPEC, M_SPEC], 1), ".npy", "2 inputs", ".npz")


def test_wrong_rank_and_static_dims(tmp_path):
    np.savez(tmp_path / "r.npz", x=np.zeros((2, 3, 16), np.float32))
    _bad(lambda: open_data(tmp_path / "r.npz", [X_SPEC], 1), "rank 3", "rank 4", "'x'")
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 3, 5, 4), np.float32))
    _bad(lambda: open_data(tmp_path / "s.npz", [X_SPEC], 1), "dim 2", "5", "(?, 3, 4, 4)")
    # dynamic dims accept any size; the batch axis is never checked
    dyn = InputSpec("x", np.float32, (1, 3, None, None))
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 7, 9), np.float32))
    assert open_data(tmp_path / "d.npz", [dyn], 2).num_samples == 5


def test_files_with_different_sample_shapes(tmp_path):
    dyn = InputSpec("x", np.float32, (None, 3, None, None))
    d = tmp_path / "dir"
    d.mkdir()
    np.save(d / "a.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(d / "b.npy", np.zeros((2, 3, 9, 9), np.float32))
    _bad(lambda: open_data(d, [dyn], 1), "b.npy", "same shape")


def test_different_sample_counts_and_zero_samples(tmp_path):
    np.savez(tmp_path / "c.npz", x=_x(3), m=_m(4))
    _bad(lambda: open_data(tmp_path / "c.npz", [X_SPEC, M_SPEC], 1), "different sample counts", "'x': 3", "'m': 4")
    np.savez(tmp_path / "z.npz", x=_x(0))
    _bad(lambda: open_data(tmp_path / "z.npz", [X_SPEC], 1), "zero samples")
    _bad(lambda: from_arrays({"x": _x(0)}, [X_SPEC], 1), "zero samples")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_reported_per_batch_with_file_and_range(tmp_path, bad):
    x = _x(12)
    x[9, 1, 2, 3] = bad
    np.savez(tmp_path / "n.npz", x=x)
    data = open_data(tmp_path / "n.npz", [X_SPEC], 4)  # opening does not scan values
    it = iter(data)
    next(it), next(it)  # samples 0..7 are fine
    _bad(lambda: next(it), "NaN or Inf", "'x'", "n.npz", "8..11")


def test_nan_in_second_file_names_that_file(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    np.save(d / "a.npy", _x(3))
    bad = _x(3, start=3)
    bad[0, 0, 0, 0] = np.nan
    np.save(d / "b.npy", bad)
    data = open_data(d, [X_SPEC], 4)
    # batch 0 = samples 0..3; the bad sample (3) is sample 0 of b.npy
    _bad(lambda: list(data), "b.npy", "samples 0..0", "3..3", "'x'")


@pytest.mark.parametrize("bs", [0, -3, 2.5, True])
def test_bad_batch_size(tmp_path, bs):
    np.save(tmp_path / "x.npy", _x(2))
    _bad(lambda: open_data(tmp_path / "x.npy", [X_SPEC], bs), "batch size", "batch_size=N")
    _bad(lambda: from_arrays({"x": _x(2)}, [X_SPEC], bs), "batch size")


def test_from_arrays_validates_like_files():
    _bad(lambda: from_arrays({"y": _x(2)}, [X_SPEC], 1), "no array for model input 'x'", "found: 'y'")
    _bad(lambda: from_arrays({"x": _x(2), "z": _m(2)}, [X_SPEC], 1), "'z'")
    _bad(lambda: from_arrays({"x": np.zeros((2, 3, 4), np.float32)}, [X_SPEC], 1), "rank 3")


def test_unreadable_file_message(tmp_path, monkeypatch):
    # the permission check itself, also where the tests run as root
    p = tmp_path / "locked.npz"
    np.savez(p, x=_x(2))
    monkeypatch.setattr("bnfold.data.sources.os.access", lambda *a, **k: False)
    _bad(lambda: open_data(p, [X_SPEC], 1), "locked.npz", "permission")
