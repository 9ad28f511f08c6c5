"""Freezing training-mode BN with calibrated statistics (Algorithm 2), through the public API.

The expected statistics are computed here by brute force in numpy float64 from the BN input
activations of the *training network* (every BN normalising with its batch statistics), with
an unequal last batch so that the weighted form of Algorithm 2 is exercised.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import npref
import numpy as np
import onnx
import pytest
from conftest import (
    EPS,
    bn_params,
    check_full,
    count_op,
    init,
    make_model,
    op_types,
    ort_run,
    rand,
    record,
    vi,
)
from onnx import helper

from bnfold.api import fold, inspect
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.records import Action, Mode, Reason

N_SAMPLES, BATCH = 10, 4  # batches of 4, 4, 2


# ---- numpy float64 reference ----------------------------------------------------------------
def batches(x, bs):
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def alg2(acts):
    """Algorithm 2, weighted form, from a list of per-batch BN inputs (N_b, C, ...)."""
    s_m = s_mu = s_var = s_m1 = 0.0
    for a in acts:
        a = np.asarray(a, np.float64)
        axes = (0,) + tuple(range(2, a.ndim))
        m = a.shape[0] * int(np.prod(a.shape[2:]))
        mu = a.mean(axis=axes)
        var = a.var(axis=axes)  # biased, two-pass
        s_m, s_mu, s_var, s_m1 = s_m + m, s_mu + m * mu, s_var + m * var, s_m1 + (m - 1)
    return s_mu / s_m, s_var / s_m1


def pooled(acts):
    a = np.concatenate([np.asarray(x, np.float64) for x in acts])
    axes = (0,) + tuple(range(2, a.ndim))
    return a.mean(axis=axes), a.var(axis=axes)


def train_bn(x, gamma, beta, eps=EPS):
    """BN in training mode: batch mean and biased batch variance."""
    x = np.asarray(x, np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    return npref.batchnorm(x, gamma, beta, x.mean(axis=axes), x.var(axis=axes), eps)


def assert_stats(stats, mean, var, rtol=1e-6):
    np.testing.assert_allclose(stats.mean, mean, rtol=rtol, atol=rtol * np.abs(mean).max())
    np.testing.assert_allclose(stats.var, var, rtol=rtol, atol=0)


# ---- builders -------------------------------------------------------------------------------
def training_bn(name, x, y, p, prefix=None, outputs=None, **attrs):
    pre = prefix or name
    names = [f"{pre}.scale", f"{pre}.bias", f"{pre}.mean", f"{pre}.var"]
    inits = [init(n, p[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))]
    outs = outputs if outputs is not None else [y, f"{name}.running_mean", f"{name}.running_var"]
    node = helper.make_node("BatchNormalization", [x, *names], outs, name=name, epsilon=EPS, training_mode=1,
                            **attrs)
    return node, inits


def conv_train_bn_model(rng, c_in=3, c_out=4, outputs=None):
    w, b = rand(rng, c_out, c_in, 3, 3), rand(rng, c_out)
    p = bn_params(rng, c_out)
    bn_node, inits = training_bn("bn", "z", "y", p, outputs=outputs)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1, 1, 1, 1]), bn_node],
                       [vi("x", ["N", c_in, 6, 5])], [vi("y", 4)], [init("w", w), init("b", b)] + inits)
    return model, w, b, p


def data(rng, c_in=3, shape=(6, 5), offset=3.0):
    return (rng.standard_normal((N_SAMPLES, c_in, *shape)) * 2.0 + offset).astype(np.float32)


# ---- tests ----------------------------------------------------------------------------------
def test_training_bn_without_data_is_a_clear_error(rng):
    model, *_ = conv_train_bn_model(rng)
    with pytest.raises(BadInputError) as err:
        fold(model)
    msg = str(err.value)
    assert "'bn'" in msg and "(the data argument)" in msg


def test_inspect_plans_a_training_bn_as_frozen(rng):
    model, *_ = conv_train_bn_model(rng)
    [row] = inspect(model)
    assert row.mode is Mode.TRAINING
    assert row.decision.action is Action.FOLDED and row.decision.target == "conv"


def test_conv_training_bn_algorithm2_and_fold(rng):
    model, w, b, p = conv_train_bn_model(rng)
    x = data(rng)
    res = fold(model, data={"x": x}, batch_size=BATCH)
    rec = record(res, "bn")
    assert rec.mode_before is Mode.TRAINING
    assert rec.action is Action.FOLDED and rec.target == "conv"
    acts = [npref.conv(xb, w, b, pads=[1] * 4) for xb in batches(x, BATCH)]
    mean, var = alg2(acts)
    assert_stats(rec.stats, mean, var)
    assert rec.stats.batches == 3 and rec.stats.samples == N_SAMPLES * 6 * 5
    pm, pv = pooled(acts)
    np.testing.assert_allclose(rec.stats.var_pooled, pv, rtol=1e-6)
    np.testing.assert_allclose(rec.stats.var_unbiased, var, rtol=1e-6)
    # the folded model: one Conv, no BN, computes the frozen BN with these statistics
    assert op_types(res.model) == ["Conv"]
    check_full(res.model)
    assert res.report.verification is not None and res.report.verification.passed
    y = ort_run(res.model, {"x": x[:3]})[0]
    expect = npref.batchnorm(npref.conv(x[:3], w, b, pads=[1] * 4), p["scale"], p["bias"], mean, var, EPS)
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-4)


def test_bn_on_input_statistics_are_the_data_statistics(rng):
    """BN as the first node: its input is the data itself; equal and unequal batches."""
    p = bn_params(rng, 3)
    bn_node, inits = training_bn("bn", "x", "y", p)
    model = make_model([bn_node], [vi("x", ["N", 3, 4, 4])], [vi("y", 4)], inits)
    x = data(rng, shape=(4, 4), offset=10.0)
    for bs in (4, 5, 10, 3):
        res = fold(model, data={"x": x}, batch_size=bs)
        rec = record(res, "bn")
        assert_stats(rec.stats, *alg2(batches(x, bs)))
        assert rec.action is Action.FROZEN_KEPT and rec.reason is Reason.NO_PRODUCER
    # pooled estimator: np.var over every value seen
    res = fold(model, data={"x": x}, batch_size=3, estimator="pooled")
    rec = record(res, "bn")
    np.testing.assert_allclose(rec.stats.var, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(rec.stats.mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    # the kept BN is now an inference BN with one output and the frozen statistics
    bn_after = next(n for n in res.model.graph.node if n.op_type == "BatchNormalization")
    assert len(bn_after.output) == 1
    assert all(a.name != "training_mode" or a.i == 0 for a in bn_after.attribute)
    check_full(res.model)
    y = ort_run(res.model, {"x": x[:2]})[0]
    np.testing.assert_allclose(y, npref.batchnorm(x[:2], p["scale"], p["bias"], rec.stats.mean, rec.stats.var, EPS),
                               rtol=1e-4, atol=1e-4)


def test_large_offset_keeps_its_digits(rng):
    """Activations 1e4 + N(0, 1): a one-pass E[x^2]-E[x]^2 in float32 would lose every digit."""
    p = bn_params(rng, 2)
    bn_node, inits = training_bn("bn", "x", "y", p)
    model = make_model([bn_node], [vi("x", ["N", 2, 8, 8])], [vi("y", 4)], inits)
    x = (1e4 + rng.standard_normal((8, 2, 8, 8))).astype(np.float32)
    res = fold(model, data={"x": x}, batch_size=3)
    mean, var = alg2(batches(x, 3))
    rec = record(res, "bn")
    np.testing.assert_allclose(rec.stats.var, var, rtol=1e-3)


def test_bn1d_batch_of_one_has_no_unbiased_estimate(rng):
    p = bn_params(rng, 3)
    bn_node, inits = training_bn("bn", "x", "y", p)
    model = make_model([bn_node], [vi("x", ["N", 3])], [vi("y", 2)], inits)
    with pytest.raises(BadInputError, match="bn"):
        fold(model, data={"x": rand(rng, 4, 3)}, batch_size=1)


def test_bn1d_after_gemm(rng):
    """Gemm -> training BN1d on (N, C): m_b = N_b."""
    bmat, c = rand(rng, 6, 4), rand(rng, 4)
    p = bn_params(rng, 4)
    bn_node, inits = training_bn("bn", "g", "y", p)
    model = make_model([helper.make_node("Gemm", ["a", "B", "C"], ["g"], name="gemm"), bn_node],
                       [vi("a", ["N", 6])], [vi("y", 2)], [init("B", bmat), init("C", c)] + inits)
    a = rand(rng, 11, 6)
    res = fold(model, data={"a": a}, batch_size=4)
    rec = record(res, "bn")
    assert rec.action is Action.FOLDED and rec.target == "gemm"
    acts = [ab.astype(np.float64) @ bmat + c for ab in batches(a, 4)]
    assert_stats(rec.stats, *alg2(acts))
    assert rec.stats.samples == 11


def test_chained_training_bns_use_the_training_network(rng):
    """BN1 -> BN2 (BN2's producer is BN1): BN2's statistics come from BN1 normalising per batch."""
    p1, p2 = bn_params(rng, 3), bn_params(rng, 3)
    bn1, i1 = training_bn("bn1", "x", "h", p1)
    bn2, i2 = training_bn("bn2", "h", "y", p2)
    model = make_model([bn1, bn2], [vi("x", ["N", 3, 4, 4])], [vi("y", 4)], i1 + i2)
    x = data(rng, shape=(4, 4))
    res = fold(model, data={"x": x}, batch_size=BATCH)
    xb = batches(x, BATCH)
    assert_stats(record(res, "bn1").stats, *alg2(xb))
    h_train = [train_bn(b, p1["scale"], p1["bias"]) for b in xb]
    m2, v2 = alg2(h_train)
    assert_stats(record(res, "bn2").stats, m2, v2, rtol=1e-5)
    assert record(res, "bn2").reason is Reason.UNSUPPORTED_PRODUCER
    check_full(res.model)


def test_conv_bn_relu_conv_bn_training_network(rng):
    """Two blocks: the second BN's input is computed with the first BN in training mode."""
    w1, w2 = rand(rng, 4, 3, 3, 3), rand(rng, 5, 4, 3, 3)
    p1, p2 = bn_params(rng, 4), bn_params(rng, 5)
    bn1, i1 = training_bn("bn1", "z1", "b1", p1)
    bn2, i2 = training_bn("bn2", "z2", "y", p2)
    model = make_model([helper.make_node("Conv", ["x", "w1"], ["z1"], name="conv1", pads=[1] * 4), bn1,
                        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
                        helper.make_node("Conv", ["r1", "w2"], ["z2"], name="conv2", pads=[1] * 4), bn2],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w1", w1), init("w2", w2)] + i1 + i2)
    x = data(rng)
    res = fold(model, data={"x": x}, batch_size=BATCH)
    z1 = [npref.conv(b, w1, pads=[1] * 4) for b in batches(x, BATCH)]
    z2 = [npref.conv(np.maximum(train_bn(z, p1["scale"], p1["bias"]), 0), w2, pads=[1] * 4) for z in z1]
    assert_stats(record(res, "bn1").stats, *alg2(z1), rtol=1e-5)
    assert_stats(record(res, "bn2").stats, *alg2(z2), rtol=1e-5)
    assert res.report.folded == 2
    assert count_op(res.model, "BatchNormalization") == 0
    assert res.report.verification.passed


def test_running_stat_outputs_still_read_are_served(rng):
    """A training BN whose running-mean output is a graph output: after freezing it is the frozen mean."""
    p = bn_params(rng, 3)
    bn_node, inits = training_bn("bn", "x", "y", p, outputs=["y", "rm", "rv"])
    model = make_model([bn_node], [vi("x", ["N", 3, 4, 4])], [vi("y", 4), vi("rm", [3])], inits)
    x = data(rng, shape=(4, 4))
    res = fold(model, data={"x": x}, batch_size=BATCH)
    check_full(res.model)
    y, rm = ort_run(res.model, {"x": x[:2]})
    np.testing.assert_allclose(rm, record(res, "bn").stats.mean, rtol=1e-6)


@pytest.mark.parametrize("outputs", [["y", "", ""], ["y", "", "rv_unused"]])
def test_empty_named_optional_outputs_do_not_crash(tmp_path, outputs):
    """training_mode=1 with ["Y", "", ""]: onnxruntime segfaults on it as is; bnfold must not hand it over.
    Run in a subprocess so that a segfault fails this test instead of killing pytest."""
    rng = np.random.default_rng(7)
    model, w, b, p = conv_train_bn_model(rng, outputs=outputs)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = data(rng)
    np.savez(tmp_path / "data.npz", x=x)
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from bnfold.api import fold
        res = fold({str(path)!r}, output={str(tmp_path / 'out.onnx')!r}, data={str(tmp_path / 'data.npz')!r},
                   batch_size={BATCH})
        rec = res.report.bns[0]
        np.save({str(tmp_path / 'mean.npy')!r}, rec.stats.mean)
        np.save({str(tmp_path / 'var.npy')!r}, rec.stats.var)
        print(rec.action.value, rec.target, res.report.verification.passed)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert proc.stdout.split()[-3:] == ["folded", "conv", "True"]
    acts = [npref.conv(xb, w, b, pads=[1] * 4) for xb in batches(x, BATCH)]
    mean, var = alg2(acts)
    np.testing.assert_allclose(np.load(tmp_path / "mean.npy"), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "var.npy"), var, rtol=1e-6)
    out = onnx.load(tmp_path / "out.onnx")
    check_full(out)
    assert count_op(out, "BatchNormalization") == 0


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_old_opset_training_bn_calibrates_by_decomposition(rng, opset):
    """Opsets 9-13 mark training mode by extra outputs; onnxruntime is not asked to run them."""
    w, b = rand(rng, 4, 3, 3, 3), rand(rng, 4)
    p = bn_params(rng, 4)
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    bn_inits = [init(n, p[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))]
    extra = ["rm", "rv", "sm", "sv"]
    attrs = {"momentum": 0.9} if opset >= 9 else {}
    bn_node = helper.make_node("BatchNormalization", ["z", *names], ["y", *extra], name="bn", epsilon=EPS, **attrs)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1] * 4), bn_node],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w", w), init("b", b)] + bn_inits,
                       opset=opset, ir_version=7)
    [row] = inspect(model)
    assert row.mode is Mode.TRAINING
    x = data(rng)
    res = fold(model, data={"x": x}, batch_size=BATCH)
    rec = record(res, "bn")
    assert rec.mode_before is Mode.TRAINING and rec.action is Action.FOLDED and rec.target == "conv"
    assert_stats(rec.stats, *alg2([npref.conv(xb, w, b, pads=[1] * 4) for xb in batches(x, BATCH)]))
    check_full(res.model)
    assert count_op(res.model, "BatchNormalization") == 0
    assert res.report.verification.passed


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("opset", [12, 17])
def test_torch_track_running_stats_false_export(rng, tmp_path, opset):
    """torch BatchNorm2d(track_running_stats=False) exports as ReduceMean/Sub/Mul feeding the BN:
    a training BN in disguise. bnfold freezes it with population statistics and folds it."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4, track_running_stats=False)
            with torch.no_grad():
                self.bn.weight.uniform_(0.5, 2.0)
                self.bn.bias.normal_()

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    net = Net().eval()
    path = tmp_path / "trs.onnx"
    bs = 2
    # The TorchScript exporter refuses a dynamic batch axis for this pattern ("batch_size and
    # channel_size must be non-None", torch 2.13), so the batch is fixed; try the dynamic axis first.
    kwargs = dict(dynamo=False, do_constant_folding=False, opset_version=opset, input_names=["x"], output_names=["y"])
    try:
        torch.onnx.export(net, (torch.randn(bs, 3, 6, 5),), str(path),
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, **kwargs)
        dynamic = True
    except Exception:
        torch.onnx.export(net, (torch.randn(bs, 3, 6, 5),), str(path), **kwargs)
        dynamic = False
    before = onnx.load(path)
    assert count_op(before, "ReduceMean") >= 2
    [row] = inspect(path)
    assert row.mode is Mode.DECOMPOSED
    x = data(rng)
    batch = BATCH if dynamic else bs
    res = fold(path, data={"x": x}, batch_size=batch)
    rec = record(res, row.name)
    assert rec.mode_before is Mode.DECOMPOSED
    assert rec.action is Action.FOLDED
    assert (row.decision.action, row.decision.target) == (rec.action, rec.target)
    ops = op_types(res.model)
    for gone in ("ReduceMean", "Sub", "Mul", "BatchNormalization", "Transpose"):
        assert gone not in ops, ops
    check_full(res.model)
    assert res.report.verification.passed
    # torch float64 reference with the same population statistics (Algorithm 2)
    net64 = net.double()
    with torch.no_grad():
        z = [net64.conv(torch.from_numpy(xb.astype(np.float64))).numpy() for xb in batches(x, batch)]
        mean, var = alg2(z)
        assert_stats(rec.stats, mean, var)
        xt = torch.from_numpy(x[:2].astype(np.float64))
        ref = torch.relu(torch.nn.functional.batch_norm(
            net64.conv(xt), torch.from_numpy(mean), torch.from_numpy(var), net64.bn.weight, net64.bn.bias,
            training=False, eps=net64.bn.eps)).numpy()
    np.testing.assert_allclose(ort_run(res.model, {"x": x[:2]})[0], ref, rtol=1e-4, atol=1e-4)


def test_training_bn_in_subgraph_is_refused(rng):
    p = bn_params(rng, 3)
    bn_node, inits = training_bn("bn", "x", "tb", p, outputs=["tb", "rm", "rv"])
    then_g = helper.make_graph([bn_node], "then", [], [vi("tb", ["N", 3, 4, 4])], initializer=inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["eb"])], "else", [], [vi("eb", ["N", 3, 4, 4])])
    model = make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                       [vi("x", ["N", 3, 4, 4]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", ["N", 3, 4, 4])])
    with pytest.raises(UnsupportedModelError, match="bn"):
        fold(model, data={"x": rand(rng, 4, 3, 4, 4), "c": np.ones(4, bool)})


def test_inference_bn_in_subgraph_kept_with_data_and_warned(rng):
    p = bn_params(rng, 3)
    bn_node, inits = training_bn("bn", "x", "tb", p, outputs=["tb"])
    bn_node.ClearField("attribute")
    bn_node.attribute.extend([helper.make_attribute("epsilon", EPS)])
    then_g = helper.make_graph([bn_node], "then", [], [vi("tb", ["N", 3, 4, 4])], initializer=inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["eb"])], "else", [], [vi("eb", ["N", 3, 4, 4])])
    pre_p = bn_params(rng, 3)
    pre, pre_i = training_bn("pre", "x0", "x", pre_p)
    model = make_model([pre, helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
                        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                       [vi("x0", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])],
                       pre_i + [init("zero", np.array(-1e9, np.float32))])
    x0 = data(rng, shape=(4, 4))
    res = fold(model, data={"x0": x0}, batch_size=BATCH)
    assert record(res, "bn").reason is Reason.IN_SUBGRAPH
    assert record(res, "bn").stats is None
    assert any("bn" in w and "subgraph" in w for w in res.report.warnings)
    assert_stats(record(res, "pre").stats, *alg2(batches(x0, BATCH)))
    check_full(res.model)
    assert res.report.verification.passed


def test_recalibrate_all_recalibrates_inference_bns_too(rng):
    """With data and recalibrate='all' every BN gets Algorithm 2 statistics, stored ones are replaced
    (issue 15: by default, recalibrate='training', inference BNs keep theirs; tests/test_recalibrate.py)."""
    from conftest import bn as inference_bn

    w = rand(rng, 4, 3, 3, 3)
    p = bn_params(rng, 4)
    bn_node, inits = inference_bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w", w)] + inits)
    x = data(rng)
    res = fold(model, data={"x": x}, batch_size=BATCH, recalibrate="all")
    rec = record(res, "bn")
    assert rec.mode_before is Mode.INFERENCE and rec.stats is not None
    mean, var = alg2([npref.conv(b, w) for b in batches(x, BATCH)])
    assert_stats(rec.stats, mean, var)
    assert not np.allclose(rec.stats.mean, p["mean"])
    y = ort_run(res.model, {"x": x[:2]})[0]
    np.testing.assert_allclose(y, npref.batchnorm(npref.conv(x[:2], w), p["scale"], p["bias"], mean, var, EPS),
                               rtol=1e-4, atol=1e-4)


def test_no_batch_size_means_one_batch(rng):
    p = bn_params(rng, 3)
    bn_node, inits = training_bn("bn", "x", "y", p)
    model = make_model([bn_node], [vi("x", ["N", 3, 4, 4])], [vi("y", 4)], inits)
    x = data(rng, shape=(4, 4))
    rec = record(fold(model, data={"x": x}), "bn")
    assert rec.stats.batches == 1
    assert_stats(rec.stats, *alg2([x]))


def test_bn1d_on_rank3_after_conv1d(rng):
    """Conv1d -> training BN1d on (N, C, L): m_b = N_b * L."""
    w = rand(rng, 4, 3, 3)
    p = bn_params(rng, 4)
    bn_node, inits = training_bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 9])], [vi("y", 3)], [init("w", w)] + inits)
    x = (rng.standard_normal((N_SAMPLES, 3, 9)) + 1).astype(np.float32)
    res = fold(model, data={"x": x}, batch_size=BATCH)
    rec = record(res, "bn")
    assert rec.stats.samples == N_SAMPLES * 7
    assert_stats(rec.stats, *alg2([npref.conv(b, w) for b in batches(x, BATCH)]))
    assert rec.action is Action.FOLDED


def test_estimator_gap_is_reported(rng):
    """One image per batch with a per-image offset: Algorithm 2 sees only within-image spread, the
    pooled variance includes the spread of the offsets. Both are reported and the gap warned about."""
    p = bn_params(rng, 2)
    bn_node, inits = training_bn("bnA", "x", "y", p)
    model = make_model([bn_node], [vi("x", ["N", 2, 4, 4])], [vi("y", 4)], inits)
    x = (rng.standard_normal((8, 2, 4, 4)) * 0.1 + rng.standard_normal((8, 1, 1, 1)) * 3).astype(np.float32)
    res = fold(model, data={"x": x}, batch_size=1)
    rec = record(res, "bnA")
    mean, var = alg2(batches(x, 1))
    assert_stats(rec.stats, mean, var)
    np.testing.assert_allclose(rec.stats.var_pooled, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-6)
    assert rec.stats.gap > 0.5
    assert any("bnA" in w and "pooled" in w for w in res.report.warnings)


@pytest.mark.parametrize("route", ["memory", "file"])
def test_calibration_weights_reach_onnxruntime_from_memory_or_through_a_file(rng, monkeypatch, route):
    """Large weights are not copied into the calibration network: its initializers are heads
    marked external and onnxruntime gets the model's own bytes (``route='memory'``); a network
    too large for one protobuf even so goes through a file (``'file'``, the limit lowered). Both
    give the brute-force Algorithm 2 statistics."""
    from bnfold.api import _load
    from bnfold.onnx import io as load
    from bnfold.stages.calibration_net import IN_MEMORY_LOCATION, IN_MEMORY_MIN_BYTES, build_calibration_model
    from bnfold.stages.work import Work

    model, w, b, p = conv_train_bn_model(rng, c_in=16, c_out=32)
    assert w.nbytes >= IN_MEMORY_MIN_BYTES > b.nbytes
    before = model.SerializeToString()
    work = Work(_load(model))
    cal, _, held = build_calibration_model(work.model, work.index, work.consts, work.sites)
    head = next(t for t in cal.graph.initializer if t.name == "w")
    assert not head.HasField("raw_data") and head.data_location == onnx.TensorProto.EXTERNAL
    assert [(e.key, e.value) for e in head.external_data] == [("location", IN_MEMORY_LOCATION)]
    assert list(held) == ["w"] and held["w"].raw_data == w.tobytes()
    assert next(t for t in cal.graph.initializer if t.name == "b").raw_data == b.tobytes()  # small: inline
    if route == "file":
        monkeypatch.setattr(load, "PROTO_LIMIT", 64)
    x = data(rng, c_in=16)
    res = fold(model, data={"x": x}, batch_size=BATCH)
    assert model.SerializeToString() == before
    acts = [npref.conv(xb, w, b, pads=[1] * 4) for xb in batches(x, BATCH)]
    mean, var = alg2(acts)
    assert_stats(record(res, "bn").stats, mean, var)
    assert res.report.verification.passed
