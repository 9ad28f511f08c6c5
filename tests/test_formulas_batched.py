"""The batched fold arithmetic gives bit for bit what ``arith`` gives one BN at a time."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import bn, bn_params, init, make_model, node_named, vi
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnfold.api import fold
from bnfold.formulas import arith, batched
from bnfold.formulas.batched import BnParams, ConvFold


def _params(rng, c, dtype=np.float32, eps=1e-5):
    return BnParams(rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype),
                    rng.standard_normal(c).astype(dtype), rng.uniform(0.1, 2.0, c).astype(dtype), eps)


def _one_at_a_time(job: ConvFold):
    w2, b2 = arith.fold_conv(job.weight, job.bias, job.s, job.t)
    try:
        w_out = arith.cast_back(w2, job.weight.dtype, original=job.weight)
        b_dtype = job.bias.dtype if job.bias is not None else job.weight.dtype
        b_orig = job.bias if job.bias is not None else np.zeros_like(b2)
        return w_out, arith.cast_back(b2, b_dtype, original=b_orig)
    except arith.FoldValueError as exc:
        return exc


def _same(a, b):
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and a.kind == b.kind
        return
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))  # bit for bit, NaN-safe


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 4), st.integers(1, 3), st.booleans(),
                          st.sampled_from(["float32", "float16", "float64"])), min_size=1, max_size=12),
       st.integers(0, 2**31 - 1))
def test_fold_conv_many_equals_one_at_a_time(specs, seed):
    rng = np.random.default_rng(seed)
    jobs = []
    for c_out, c_in, k, has_bias, dt in specs:
        w = rng.standard_normal((c_out, c_in, k, k)).astype(dt)
        b = rng.standard_normal(c_out).astype(dt) if has_bias else None
        p = _params(rng, c_out, eps=float(rng.uniform(1e-6, 1e-2)))
        s, t = arith.bn_scale_shift(p.gamma, p.beta, p.mean, p.var, p.eps)
        jobs.append(ConvFold(w, b, s, t))
    for got, job in zip(batched.fold_conv_many(jobs), jobs):
        _same(got, _one_at_a_time(job))


def test_scale_shift_many_equals_bn_scale_shift():
    rng = np.random.default_rng(1)
    params = [_params(rng, c, dtype=dt, eps=e) for c, dt, e in
              [(3, np.float32, 1e-5), (1, np.float16, 1e-3), (17, np.float64, 0.0), (8, np.float32, 0.1)]]
    params[2] = BnParams(params[2].gamma, params[2].beta, params[2].mean, params[2].var + 1.0, 0.0)
    for (s, t), p in zip(batched.scale_shift_many(params), params):
        s1, t1 = arith.bn_scale_shift(p.gamma, p.beta, p.mean, p.var, p.eps)
        assert np.array_equal(s, s1) and np.array_equal(t, t1) and s.dtype == np.float64


def test_scale_shift_many_raises_like_arith_for_a_bad_variance():
    rng = np.random.default_rng(2)
    good = _params(rng, 4)
    bad = BnParams(good.gamma, good.beta, good.mean, np.array([1.0, -5.0, 1.0, 1.0], np.float32), 1e-5)
    with pytest.raises(ValueError, match=r"channel\(s\) \[1\]"):
        batched.scale_shift_many([good, bad])


def test_overflow_is_attributed_to_the_right_fold():
    rng = np.random.default_rng(3)
    ok = ConvFold(rng.standard_normal((2, 1, 1, 1)).astype(np.float16), None, np.ones(2), np.zeros(2))
    huge = ConvFold(np.full((2, 1, 1, 1), 100.0, np.float16), None, np.array([1e4, 1.0]), np.zeros(2))
    res = batched.fold_conv_many([ok, huge, ok])
    assert isinstance(res[1], arith.FoldValueError) and res[1].kind == "overflow"
    _same(res[0], _one_at_a_time(ok))
    _same(res[2], _one_at_a_time(ok))


def test_batches_are_split_by_size(monkeypatch):
    monkeypatch.setattr(batched, "BATCH_ELEMENTS", 64)
    rng = np.random.default_rng(4)
    jobs = []
    for c in range(1, 30):
        w = rng.standard_normal((c % 4 + 1, 2, 2, 2)).astype(np.float32)
        jobs.append(ConvFold(w, None, rng.uniform(0.5, 2, w.shape[0]), rng.standard_normal(w.shape[0])))
    jobs.append(ConvFold(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), None, np.ones(8), np.zeros(8)))
    for got, job in zip(batched.fold_conv_many(jobs), jobs):
        _same(got, _one_at_a_time(job))


def test_wrong_shapes_raise_as_arith_does():
    w = np.ones((3, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="channels"):
        batched.fold_conv_many([ConvFold(w, None, np.ones(2), np.zeros(2))])


def test_a_bias_of_the_wrong_length_raises_as_arith_does():
    # batched with a fold of the same group, the short bias must not shift its neighbour's values
    w = np.ones((3, 1, 1, 1), np.float32)
    ok = ConvFold(w, np.ones(3, np.float32), np.ones(3), np.zeros(3))
    bad = ConvFold(w, np.ones(2, np.float32), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError) as batched_error:
        batched.fold_conv_many([ok, bad])
    with pytest.raises(ValueError) as arith_error:
        arith.fold_conv_cast(bad.weight, bad.bias, bad.s, bad.t)
    assert str(batched_error.value) == str(arith_error.value)


@pytest.mark.parametrize("uniform", [True, False])
def test_fold_conv_flat_rows_and_repeat_paths_equal_one_at_a_time(uniform):
    # equal sizes per output channel take the row path, mixed sizes the repeat path: both bit for
    # bit the one-at-a-time result
    rng = np.random.default_rng(3)
    shapes = [(4, 2, 3, 3)] * 3 if uniform else [(4, 2, 3, 3), (2, 1, 1, 1), (3, 5, 3, 3)]
    jobs = []
    for shape in shapes:
        p = _params(rng, shape[0])
        s, t = arith.bn_scale_shift(p.gamma, p.beta, p.mean, p.var, p.eps)
        jobs.append(ConvFold(rng.standard_normal(shape).astype(np.float32),
                             rng.standard_normal(shape[0]).astype(np.float32), s, t))
    w_out, b_out = batched.fold_conv_flat(
        np.concatenate([j.weight.reshape(-1) for j in jobs]),
        np.repeat([j.weight[0].size for j in jobs], [j.weight.shape[0] for j in jobs]),
        np.concatenate([j.s for j in jobs]), np.concatenate([j.t for j in jobs]),
        np.concatenate([j.bias for j in jobs]).astype(np.float64), np.dtype(np.float32))
    ref_w = np.concatenate([_one_at_a_time(j)[0].reshape(-1) for j in jobs])
    ref_b = np.concatenate([_one_at_a_time(j)[1] for j in jobs])
    _same((w_out, b_out), (ref_w, ref_b))


def _small_conv_model(rng, n):
    """``n`` Conv -> BN pairs in a row, weights of a few shapes, some without a bias."""
    nodes, inits, expect = [], [], []
    x, c = "x", 3
    for i in range(n):
        c_out = (2, 3, 4)[i % 3]
        w = rng.standard_normal((c_out, c, 1 + i % 2, 1 + i % 2)).astype(np.float32)
        b = rng.standard_normal(c_out).astype(np.float32) if i % 4 else None
        ins = [x, f"w{i}"] + ([f"b{i}"] if b is not None else [])
        nodes.append(helper.make_node("Conv", ins, [f"z{i}"], name=f"conv{i}", pads=[i % 2] * 4))
        inits += [init(f"w{i}", w)] + ([init(f"b{i}", b)] if b is not None else [])
        p = bn_params(rng, c_out)
        node, bn_inits = bn(f"bn{i}", f"z{i}", f"y{i}", p)
        nodes.append(node)
        inits += bn_inits
        s, t = arith.bn_scale_shift(p["scale"], p["bias"], p["mean"], p["var"], 1e-5)
        expect.append((f"conv{i}", ConvFold(w, b, s, t)))
        x, c = f"y{i}", c_out
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi(x, 4)], inits)
    return model, expect


@pytest.mark.parametrize("limit", [None, 40])
def test_the_fold_stage_batches_through_fold_convs(monkeypatch, limit):
    """The ONNX fold stage computes its small Conv folds with ``fold_convs`` (the function
    ``fold_conv_many``, which the tests above hold to one-at-a-time results, runs on) and writes
    exactly what they are one at a time."""
    if limit is not None:
        monkeypatch.setattr(batched, "BATCH_ELEMENTS", limit)
    seen: list[int] = []
    real = batched.fold_convs

    def spy(specs, values):
        seen.append(len(specs))
        return real(specs, values)

    monkeypatch.setattr(batched, "fold_convs", spy)
    model, expect = _small_conv_model(np.random.default_rng(5), 9)
    res = fold(model, verify=False)
    assert seen == [9 if limit is None else sum(j.weight.size <= limit // 4 for _, j in expect)]
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for conv, job in expect:
        node = node_named(res.model, conv)
        _same((inits[node.input[1]], inits[node.input[2]]), _one_at_a_time(job))


_ELEM = {np.float32: onnx.TensorProto.FLOAT, np.float16: onnx.TensorProto.FLOAT16,
         np.float64: onnx.TensorProto.DOUBLE}


def test_the_fold_stage_reads_and_writes_mixed_batches_bit_for_bit(monkeypatch):
    """Side by side Conv -> BN branches of three dtypes, with and without a bias, one weight held
    as float_data rather than raw bytes: the stage reads each batch's weights and biases from the
    initializers in one piece, writes each Conv its own share, and every folded tensor is bit for
    bit the one-at-a-time fold."""
    rng = np.random.default_rng(11)
    seen: list[int] = []
    real = batched.fold_convs

    def spy(specs, values):
        seen.append(len(specs))
        return real(specs, values)

    monkeypatch.setattr(batched, "fold_convs", spy)
    nodes, inits, inputs, outputs, expect = [], [], [], [], []
    dtypes = [np.float32, np.float16, np.float64]
    for i in range(12):
        dt = dtypes[i % 3]
        c_out, c_in, k = 2 + i % 4, 1 + i % 3, 1 + i % 2
        w = rng.standard_normal((c_out, c_in, k, k)).astype(dt)
        b = rng.standard_normal(c_out).astype(dt) if i % 5 else None
        if i == 7:  # not raw data: read as an array, folded on its own
            inits.append(helper.make_tensor(f"w{i}", _ELEM[dt], w.shape, w.reshape(-1).tolist()))
        else:
            inits.append(init(f"w{i}", w))
        if b is not None:
            inits.append(init(f"b{i}", b))
        conv_in = [f"x{i}", f"w{i}"] + ([f"b{i}"] if b is not None else [])
        nodes.append(helper.make_node("Conv", conv_in, [f"z{i}"], name=f"conv{i}"))
        p = bn_params(rng, c_out, dtype=dt)
        node, bn_inits = bn(f"bn{i}", f"z{i}", f"y{i}", p)
        nodes.append(node)
        inits += bn_inits
        eps = float(np.float32(1e-5))  # the epsilon attribute is a float32
        s, t = arith.bn_scale_shift(p["scale"], p["bias"], p["mean"], p["var"], eps)
        expect.append((f"conv{i}", f"w{i}", ConvFold(w, b, s, t)))
        inputs.append(vi(f"x{i}", [1, c_in, 5, 5], _ELEM[dt]))
        outputs.append(vi(f"y{i}", 4, _ELEM[dt]))
    res = fold(make_model(nodes, inputs, outputs, inits), verify=False)
    assert res.report.folded == 12 and seen == [12]
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for conv, w_name, job in expect:
        node = node_named(res.model, conv)
        assert node.input[1] == w_name  # the sole reader: folded in place
        _same((out[node.input[1]], out[node.input[2]]), _one_at_a_time(job))
