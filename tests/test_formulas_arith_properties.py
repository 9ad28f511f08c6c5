"""Property tests: random conv / conv-transpose / gemm shapes and BN parameters, each fold checked
against BN(producer(x)) computed in float64 with the independent reference ``npref``."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.formulas.arith import (
    bn_scale_shift,
    fold_conv,
    fold_conv_transpose,
    fold_forward_conv,
    fold_gemm,
)

try:
    import npref
except ImportError:  # tests/ is a package
    from tests import npref

RTOL = 1e-10
SETTINGS = settings(max_examples=40, deadline=None)


def assert_close(got, ref, rtol=RTOL):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(float(np.abs(ref).max()), 1e-300)
    err = float(np.abs(got - ref).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def bn_params(rng, c):
    """Random inference BN: var > 0, gamma of either sign (or no affine parameters)."""
    affine = rng.random() < 0.8
    gamma = rng.uniform(0.2, 3.0, c) * rng.choice([-1.0, 1.0], c) if affine else None
    beta = rng.normal(0.0, 2.0, c) if affine else None
    mean = rng.normal(0.0, 2.0, c)
    var = rng.uniform(1e-3, 5.0, c)
    eps = float(rng.choice([1e-5, 1e-3, 0.0]))
    return gamma, beta, mean, var, eps


@st.composite
def conv_case(draw, transpose=False, padded=True):
    d = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin_g = draw(st.integers(1, 3))
    cout_g = draw(st.integers(1, 3))
    max_k = 3 if d < 3 else 2
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(d))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * d)) if padded else (0,) * (2 * d)
    if transpose:
        # ONNX/torch: output_padding < max(stride, dilation); pads must leave >= 1 output
        opad = tuple(draw(st.integers(0, max(strides[i], dilations[i]) - 1)) for i in range(d))
        sizes = tuple(draw(st.integers(1, 4 if d < 3 else 3)) for _ in range(d))
        for i in range(d):
            full = strides[i] * (sizes[i] - 1) + dilations[i] * (kernel[i] - 1) + 1 + opad[i]
            if pads[i] + pads[d + i] >= full:
                pads = (0,) * (2 * d)
    else:
        opad = None
        # input size so that the (padded) input covers the dilated kernel at least once
        sizes = tuple(
            max(1, dilations[i] * (kernel[i] - 1) + 1 - pads[i] - pads[d + i]) + draw(st.integers(0, 3))
            for i in range(d)
        )
    return dict(
        d=d, groups=groups, cin_g=cin_g, cout_g=cout_g, kernel=kernel, strides=strides,
        dilations=dilations, pads=pads, output_padding=opad, sizes=sizes,
        batch=draw(st.integers(1, 2)), bias=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


def _unchanged(arrays, before):
    for a, b in zip(arrays, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@SETTINGS
@given(conv_case())
def test_conv_fold_equivalence(case):
    rng = np.random.default_rng(case["seed"])
    g, c_in, c_out = case["groups"], case["groups"] * case["cin_g"], case["groups"] * case["cout_g"]
    x = rng.standard_normal((case["batch"], c_in) + case["sizes"])
    w = rng.standard_normal((c_out, case["cin_g"]) + case["kernel"])
    b = rng.standard_normal(c_out) if case["bias"] else None
    bn = bn_params(rng, c_out)
    attrs = dict(strides=case["strides"], pads=case["pads"], dilations=case["dilations"], groups=g)
    ref = npref.batchnorm(npref.conv(x, w, b, **attrs), *bn)

    w0, b0 = w.copy(), None if b is None else b.copy()
    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_conv(w, b, s, t)
    _unchanged([w, b], [w0, b0])
    assert_close(npref.conv(x, w2, b2, **attrs), ref)


@SETTINGS
@given(conv_case(transpose=True))
def test_conv_transpose_fold_equivalence(case):
    rng = np.random.default_rng(case["seed"])
    g, c_in, c_out = case["groups"], case["groups"] * case["cin_g"], case["groups"] * case["cout_g"]
    x = rng.standard_normal((case["batch"], c_in) + case["sizes"])
    w = rng.standard_normal((c_in, case["cout_g"]) + case["kernel"])
    b = rng.standard_normal(c_out) if case["bias"] else None
    bn = bn_params(rng, c_out)
    attrs = dict(
        strides=case["strides"], pads=case["pads"], output_padding=case["output_padding"],
        dilations=case["dilations"], groups=g,
    )
    ref = npref.batchnorm(npref.conv_transpose(x, w, b, **attrs), *bn)

    w0, b0 = w.copy(), None if b is None else b.copy()
    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_conv_transpose(w, b, s, t, g)
    _unchanged([w, b], [w0, b0])
    assert_close(npref.conv_transpose(x, w2, b2, **attrs), ref)


@SETTINGS
@given(conv_case(padded=False))
def test_forward_conv_fold_equivalence(case):
    rng = np.random.default_rng(case["seed"])
    g, c_in, c_out = case["groups"], case["groups"] * case["cin_g"], case["groups"] * case["cout_g"]
    x = rng.standard_normal((case["batch"], c_in) + case["sizes"])
    w = rng.standard_normal((c_out, case["cin_g"]) + case["kernel"])
    b = rng.standard_normal(c_out) if case["bias"] else None
    bn = bn_params(rng, c_in)
    attrs = dict(strides=case["strides"], dilations=case["dilations"], groups=g)
    ref = npref.conv(npref.batchnorm(x, *bn), w, b, **attrs)

    w0, b0 = w.copy(), None if b is None else b.copy()
    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_forward_conv(w, b, s, t, g)
    _unchanged([w, b], [w0, b0])
    assert_close(npref.conv(x, w2, b2, **attrs), ref)


@SETTINGS
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    n=st.integers(1, 5),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.25, 0.0]),
    c_kind=st.sampled_from(["none", "scalar", "one", "vec", "row", "one-one"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_gemm_fold_equivalence(m, k, n, trans_a, trans_b, alpha, beta, c_kind, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    bmat = rng.standard_normal((n, k) if trans_b else (k, n))
    c = {
        "none": None, "scalar": np.float64(rng.normal()), "one": rng.standard_normal(1),
        "vec": rng.standard_normal(n), "row": rng.standard_normal((1, n)), "one-one": rng.standard_normal((1, 1)),
    }[c_kind]
    bn = bn_params(rng, n)
    ref = npref.batchnorm(npref.gemm(a, bmat, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b), *bn)

    b2, c2 = fold_gemm(bmat, c, *bn_scale_shift(*bn), trans_b=trans_b, alpha=alpha, beta=beta, n=n)
    got = npref.gemm(a, b2, c2, alpha=alpha, beta=1.0, trans_a=trans_a, trans_b=trans_b)
    assert_close(got, ref)
